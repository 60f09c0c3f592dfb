"""Lesson 4, solved: the exercises `bits_per_weight` and `dequantize`."""


def bits_per_weight(out_features, in_features, bits, group_size):
    """Bits per weight of one linear in a GPTQ checkpoint."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)  # a short last group counts whole
    qweight = bits * in_features * out_features
    qzeros = bits * groups * out_features
    scales = 16 * groups * out_features
    g_idx = 32 * in_features
    return (qweight + qzeros + scales + g_idx) / (out_features * in_features)


def dequantize(codes, scales, zeros, g_idx):
    """W (out, in) from the checkpoint's codes, scales, zeros and g_idx."""
    return scales[:, g_idx] * (codes - zeros[:, g_idx])
