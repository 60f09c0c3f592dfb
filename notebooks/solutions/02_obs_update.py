"""Lesson 2, solved: the exercises `obs_update` and `obs_loss`."""


def obs_update(w, Hinv, q, wq):
    """delta (d,): how every weight of the row w changes when w[q] is set to wq."""
    return -(w[q] - wq) / Hinv[q, q] * Hinv[:, q]


def obs_loss(w, Hinv, q, wq):
    """The loss of setting w[q] to wq once the other weights have compensated."""
    return (w[q] - wq) ** 2 / (2 * Hinv[q, q])
