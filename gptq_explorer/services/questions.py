"""Questions people ask about GPTQ, answered once and shown twice: docs/questions.md (render_markdown) and
the app's Questions tab (ui/questions_tab.py).

Each answer is markdown (paragraphs, `code`, **bold**, [links](page.md)) with links to the docs by file
name; each Link is an app state as a query string in the app's own keys (docs/app.md, "Links"), so the
page can link the running app and the app can reopen itself in that state. The numbers the answers quote
come from the shipped reports; tests/test_services_questions.py checks them, and checks that every query
parses with the app's link parsers.
"""

from __future__ import annotations

from dataclasses import dataclass

APP_URL = "http://127.0.0.1:8866/"  # where ./run.sh app serves the explorer (docs/app.md)


@dataclass(frozen=True)
class Link:
    query: str  # an app state, without the leading '?'
    shows: str  # what the link opens, in a few words


@dataclass(frozen=True)
class Question:
    slug: str  # the anchor in docs/questions.md
    title: str  # the question as it was asked
    source: str  # where it was asked: "owner/repo#number"
    answer: str  # markdown
    links: tuple[Link, ...]

    @property
    def source_url(self) -> str:
        repo, number = self.source.split("#")
        return f"https://github.com/{repo}/issues/{number}"


QUESTIONS: tuple[Question, ...] = (
    Question(
        "desc-act", "What the `desc_act` actually means?", "AutoGPTQ/AutoGPTQ#456",
        "GPTQ rounds a layer's input columns one at a time and pushes each column's rounding error onto the "
        "columns it has not rounded yet. `desc_act` (\"act-order\") only changes the order: columns go by "
        "decreasing diag(H), that is by how much signal their input carries on the calibration tokens. The "
        "inputs that matter most are rounded first, while many columns are still free to absorb their "
        "error; the quiet inputs come last, where little is left to compensate. The weights, grid and "
        "Hessian are the same. The price comes with groups: a group's columns are no longer processed "
        "together, so the checkpoint needs `g_idx` to say which grid each column uses, and a kernel has to "
        "gather (`static_groups` computes every group's grid up front to avoid that). Open the same layer "
        "twice and compare the held-out output error in the summary (on the synthetic layer at 3 bits per "
        "row, desc_act lowers it by about 40%), and the diag(H) strip, which is drawn in processing order. "
        "Lesson 5 measures it on SmolLM2's layers ([teaching.md](teaching.md)).",
        (Link("tab=layer&model=synthetic&bits=3&group_size=-1&desc_act=0",
              "the synthetic layer, 3-bit, one grid per row, columns in order"),
         Link("tab=layer&model=synthetic&bits=3&group_size=-1&desc_act=1",
              "the same layer and grid with desc_act: lower held-out error")),
    ),
    Question(
        "percdamp", "percdamp clarification for dummies", "fpgaminer/GPTQ-triton#10",
        "GPTQ needs H⁻¹, with H = 2/n Σ x xᵀ the Hessian of the layer's inputs. Its eigenvalues span many "
        "decades: directions the calibration text explores a lot have large ones, directions it hardly "
        "visits have tiny or zero ones, and in those H⁻¹ is huge, so GPTQ would make large corrections "
        "based on almost no evidence. `percdamp` (`damp_percent` here) adds λ = percdamp · mean(diag H) to "
        "every eigenvalue: the condition number λmax / λmin becomes (λmax + λ) / (λmin + λ), and the "
        "Cholesky factorisation becomes possible and stable. Too little leaves the problem; too much makes "
        "H + λI look like a multiple of I, whose inverse gives no useful correction, so GPTQ drifts towards "
        "round-to-nearest (the preset \"Heavy damping (30%)\"). The default 1% sits between. The Hessian "
        "view shows the spectrum and the condition number before and after damping; move the damping "
        "slider and watch both.",
        (Link("tab=layer&model=synthetic&hessian=1&damp_percent=0.001",
              "the Hessian view at 0.1% damping: the condition number before and after"),
         Link("tab=layer&model=synthetic&hessian=1&damp_percent=0.1",
              "the same layer at 10% damping")),
    ),
    Question(
        "logged-loss", "What does the errors meaning when doing quantization?",
        "vllm-project/llm-compressor#1913",
        "The number a GPTQ run logs per layer is the sum of its per-column OBS losses, Σ (w − q)² / (2 d²) "
        "with d the column's diagonal entry in the Cholesky factor of (H + λI)⁻¹: the cost GPTQ itself "
        "estimates for each rounding. Summed over the layer it is exactly "
        "L = ½ tr(ΔW (H + λI) ΔWᵀ) with ΔW = W − Q: the squared output error on the calibration tokens, in "
        "the units of that tool's H, plus the damping's share λ/2 ‖ΔW‖². So it is an absolute number: it "
        "grows with the size of the layer's inputs and weights, differs between layers for that reason "
        "alone, and is only comparable between tools after removing each tool's scale. "
        "`gptq_explorer.metrics.logged_loss.relative_error_from_logged` turns a logged loss into "
        "‖XWᵀ − XQᵀ‖² / ‖XWᵀ‖², the share of the layer's output lost, for this engine (L), GPTQModel "
        "(L / tokens) and the paper's code (its H divides by sequences, so its L is seqlen times ours); "
        "`tests/test_metrics_logged_loss.py` checks the identity on our engine, the paper's loop and "
        "GPTQModel 7.6 itself. In the Layer Lab, the summary shows L for GPTQ and for RTN beside the "
        "held-out output error.",
        (Link("tab=layer&model=synthetic&bits=3",
              "the summary: OBS loss L beside the held-out output error, GPTQ and RTN"),),
    ),
    Question(
        "loss-high", "the loss is very high", "ModelCloud/GPTQModel#1042",
        "High compared to what? GPTQModel 7.6 logs L / n, where L = ½ tr(ΔW (H + λI) ΔWᵀ) is already "
        "measured with a per-token Hessian and n is the number of calibration tokens: the logged number "
        "falls as you add calibration data even when the layer's error does not change, and it scales with "
        "the square of the layer's activations, which are much larger in some layers (MLP down "
        "projections, late blocks) than in others. A large value on one layer is therefore not by itself a "
        "sign of failure. Convert it to a relative output error "
        "(`metrics.logged_loss.relative_error_from_logged`, see the question above) and compare that with "
        "round-to-nearest on the same layer: if GPTQ's relative error is well below RTN's, GPTQ did its "
        "job, and a bad model comes from elsewhere (too few bits for the model, or calibration text unlike "
        "the evaluation text). The Layer Lab shows the comparison at 2 bits per row, where every loss is "
        "large and GPTQ's held-out error is still about half of RTN's on the synthetic layer.",
        (Link("tab=layer&model=synthetic&bits=2&group_size=-1",
              "2-bit per row: large losses, and GPTQ still well below RTN"),),
    ),
    Question(
        "gptaq", "does v1 means GPTQ, v2 means GPTAQ?", "ModelCloud/GPTQModel#2074",
        "Two different things share the name. `gptq_v2` is a **checkpoint format**: version 1 stores each "
        "zero point minus one (a quirk of the original packer), v2 stores it as it is; the weights mean the "
        "same, and lesson 8 opens both ([checkpoints.md](checkpoints.md)). GPTAQ is an **algorithm**, "
        "published as \"GPTQv2\": where GPTQ fits each layer to its own inputs in the partly quantized "
        "model, GPTAQ also pulls its output towards the full-precision model's, with a correction term "
        "weighted by α ([methods.md](methods.md)). Any algorithm's result can be saved in either format. "
        "On SmolLM2 at 3 bits with groups of 128, GPTAQ (α = 0.25) lowered perplexity from 45.04 to 29.69 "
        "on prose and from 55.53 to 31.64 on code, while its layers fit their own inputs slightly worse "
        "(reduced protocol, [methods.md](methods.md)). In the Layer Lab pick a layer after block 0 (there "
        "both models feed the layer the same inputs, so GPTAQ equals GPTQ): the compensation panel splits "
        "into the OBS update and GPTAQ's correction.",
        (Link("tab=layer&model=smollm2-135m&block=5&bits=3&gptaq_alpha=0.25",
              "GPTAQ on SmolLM2's block 5 q_proj: its correction drawn beside the OBS update"),
         Link("tab=model&ml.bits=3&ml.gptaq_alpha=0.25",
              "the Model Lab's method table: GPTAQ against GPTQ on the whole model")),
    ),
    Question(
        "calibration-domain", "Why LLaMA3-8B after GPTQ test in wikitext2 so bad?", "AutoGPTQ/AutoGPTQ#650",
        "First check that the two numbers were measured the same way (same windows, same tokens: "
        "[results.md](results.md) uses windows of 2048, the paper's protocol). Then look at what GPTQ was "
        "calibrated on. GPTQ fits each layer to the inputs it saw during calibration; on text of another "
        "kind the fit helps less. The shipped SmolLM2 runs were calibrated on prose: at 4 bits with groups "
        "of 128, GPTQ removes 45% of round-to-nearest's perplexity increase on prose but only 26% on code "
        "([results.md](results.md)). Calibrating on code instead was better on code for all five seeds of "
        "lesson 6 ([teaching.md](teaching.md)). So calibrate on text like what you will evaluate (for "
        "wikitext2, wikitext2's training split or similar prose), and compare with RTN at the same bits "
        "before blaming GPTQ. The Model Lab shows both corpora side by side for the shipped runs.",
        (Link("tab=model", "the shipped 4-bit g128 runs: FP, RTN and GPTQ on prose and on code"),
         Link("tab=model&ml.bits=3", "the same at 3 bits")),
    ),
    Question(
        "cholesky", "Cholesky requires positive definite", "vllm-project/llm-compressor#142",
        "GPTQ factorises H + λI with Cholesky, which needs every eigenvalue above zero. H = 2/n Σ x xᵀ is "
        "singular whenever the calibration tokens do not span every input direction: fewer tokens than "
        "inputs, inputs that are always zero (dead) or copies of each other. In exact arithmetic any λ > 0 "
        "fixes that, but in float32 a tiny λ is lost in rounding next to the large eigenvalues, and the "
        "factorisation fails. The remedies: more (and more varied) calibration tokens, or more damping. "
        "This engine retries with ten times the damping, up to a limit, and the Layer Lab's summary says "
        "when it did; GPTQModel 7.6 also raises the damping step by step; others stop with this error. "
        "The link below calibrates SmolLM2's MLP down projection, which has 1,536 inputs, on only 4 windows "
        "of 256 tokens (1,024 tokens), with 0.1% damping: its Hessian cannot have full rank, and the "
        "Hessian view shows the zero eigenvalues and what the damping does to the condition number.",
        (Link("tab=layer&model=smollm2-135m&sublayer=mlp.down_proj&nsamples=4&damp_percent=0.001&hessian=1",
              "a rank-deficient Hessian (1,024 tokens, 1,536 inputs) at 0.1% damping"),),
    ),
)


def app_url(query: str, base: str = APP_URL) -> str:
    return f"{base}?{query}"


def render_markdown(base: str = APP_URL) -> str:
    """docs/questions.md."""
    out = [
        "# Questions people ask",
        "",
        "Questions asked in the issue trackers of GPTQ's implementations, each answered in a paragraph with "
        "links that open the explorer in the state that shows the answer (start it with `./run.sh app`; "
        "[app.md](app.md)). The app's **Questions** tab shows the same answers, its links opening the app "
        "itself. This page is generated from `gptq_explorer/services/questions.py` (`python -m "
        "gptq_explorer.services.questions > docs/questions.md`); edit the answers there.",
        "",
    ]
    for q in QUESTIONS:
        out += [f"## {q.title}", "", f"*Asked in [{q.source}]({q.source_url}).*", "", q.answer, ""]
        out += [f"- [{link.shows}]({app_url(link.query, base)})" for link in q.links]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # python -m gptq_explorer.services.questions > docs/questions.md
    print(render_markdown(), end="")
