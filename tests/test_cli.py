"""`gptq-explorer quantize` end to end on a tiny random-init LLaMA (real model code, real corpora):
fp / rtn / gptq runs, the --json report, --override, --save, and the errors for bad arguments."""

import copy
import json
import math

import pytest
import torch
from tiny_models import VOCAB, make_tiny_model

from gptq_explorer import cli
from gptq_explorer.checkpoint import load_quantized
from gptq_explorer.data import evaluation_ids
from gptq_explorer.metrics import perplexity
from gptq_explorer.models import load_model, set_weight
from gptq_explorer.models import quantize as qmod

# small runs: 4 calibration windows of 64 tokens, 512 evaluation tokens per corpus
FAST = ["--nsamples", "4", "--seqlen", "64", "--eval-tokens", "512", "--quiet"]
N_LINEARS = 2 * 7  # two LLaMA blocks of q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("cli") / "llama"))


def run(tmp_path, tiny, *extra, name="run"):
    path = tmp_path / f"{name}.json"
    rc = cli.main(["quantize", "--model", tiny, *FAST, "--json", str(path), *extra])
    assert rc == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def reports(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reports")
    common = ("--bits", "3", "--group-size", "32", "--eval", "prose,code")
    return {m: run(tmp, tiny, "--method", m, *common, name=m) for m in ("fp", "rtn", "gptq")}


def test_json_schema_and_perplexities(reports):
    keys = {"model", "source", "method", "config", "true_sequential", "overrides", "threads", "calibration",
            "evaluation", "layers", "perplexity", "timings", "memory", "export"}  # fmt: skip
    for method, rep in reports.items():
        assert keys <= set(rep), (method, keys - set(rep))
        assert rep["method"] == method
        assert set(rep["perplexity"]) == {"prose", "code"}
        assert all(math.isfinite(v) and v > 1 for v in rep["perplexity"].values())
        assert rep["perplexity_windows"] == {"prose": 8, "code": 8}  # 512 tokens / windows of 64
        assert rep["evaluation"]["corpus_info"]["prose"]["sha256"]
        assert rep["export"] is None
    fp, rtn, gptq = reports["fp"], reports["rtn"], reports["gptq"]
    # 3-bit weights change what the model predicts. The tiny random model predicts almost uniformly
    # (perplexity ~ its 260-token vocabulary), so the change is small and depends on the text, which
    # depends on the CPython version (RTN: 0.09% on 3.12.3's prose, more on 3.11.7's).
    for corpus in ("prose", "code"):
        assert abs(rtn["perplexity"][corpus] / fp["perplexity"][corpus] - 1) > 1e-4
        assert abs(gptq["perplexity"][corpus] / fp["perplexity"][corpus] - 1) > 1e-4
    assert fp["layers"] == [] and fp["calibration"] is None and fp["memory"] == {}
    assert rtn["calibration"] is None  # RTN needs no data
    assert gptq["calibration"]["nsamples"] == 4 and gptq["calibration"]["seqlen"] == 64
    assert "quantize" in gptq["timings"] and gptq["memory"]["peak_rss_bytes"] > 0
    assert {rep["environment"]["device"] for rep in reports.values()} == {"cpu"}  # no --device: the CPU
    assert "gpu" not in gptq["environment"]
    # the vector instructions torch's CPU kernels use, which set CPU timings (AVX2 vs AVX512: about 2x)
    assert gptq["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""


def test_fp_perplexity_is_the_models_own(reports, tiny):
    """The CLI's FP number is the paper-protocol perplexity of the untouched model on the same tokens."""
    loaded = load_model(tiny)
    ids = evaluation_ids(loaded.tokenizer, "prose", 512)
    want = perplexity(loaded.model, ids, seqlen=64, progress=False).ppl
    assert reports["fp"]["perplexity"]["prose"] == pytest.approx(want, rel=1e-6)


def test_per_layer_rows(reports):
    for method in ("rtn", "gptq"):
        rows = reports[method]["layers"]
        assert len(rows) == N_LINEARS
        assert {r["block"] for r in rows} == {0, 1}
        assert all(r["bits"] == 3 and r["group_size"] == 32 and r["method"] == method for r in rows)
        assert all(0 < r["weight_rel_error"] < 1 for r in rows)
    gptq = reports["gptq"]["layers"]
    assert all(r["output_rel_error"] is not None and 0 < r["output_rel_error"] < 1 for r in gptq)
    assert all(r["h_trace"] > 0 and r["loss"] >= 0 for r in gptq)
    # true-sequential order inside a block: k, v, q share the first group; down_proj is last
    assert [r["name"].rsplit(".", 1)[-1] for r in gptq[:7]][-1] == "down_proj"


def test_printed_table(tiny, tmp_path, capsys):
    assert cli.main(["quantize", "--model", tiny, *FAST, "--method", "rtn", "--eval", "prose"]) == 0
    out = capsys.readouterr().out
    assert "RTN 4-bit" in out, out
    assert "prose" in out and "model.layers.1.mlp.down_proj" in out


def test_rtn_calib_measures_rtn_on_gptqs_inputs(reports, tiny, tmp_path):
    """--rtn-calib: the same RTN weights and perplexity, plus per-layer output errors on the calibration
    inputs GPTQ saw, so the two can be compared layer by layer (GPTQ's are lower where inputs agree)."""
    common = ("--bits", "3", "--group-size", "32", "--eval", "prose,code")
    rep = run(tmp_path, tiny, "--method", "rtn", "--rtn-calib", *common, name="rtn-calib")
    assert rep["perplexity"] == pytest.approx(reports["rtn"]["perplexity"], rel=1e-9)
    assert rep["calibration"]["nsamples"] == 4 and rep["calibration"]["seqlen"] == 64
    rows = {r["name"]: r for r in rep["layers"]}
    plain = {r["name"]: r for r in reports["rtn"]["layers"]}
    assert rows.keys() == plain.keys()
    for name, r in rows.items():
        assert r["weight_rel_error"] == pytest.approx(plain[name]["weight_rel_error"], rel=1e-9)
        assert 0 < r["output_rel_error"] < 1
    gptq = {r["name"]: r for r in reports["gptq"]["layers"]}
    first = [n for n in rows if n.startswith("model.layers.0.self_attn.") and n[-6:] in ("q_proj", "k_proj",
                                                                                       "v_proj")]
    assert len(first) == 3  # block 0's q/k/v see the very same inputs under both methods
    for name in first:
        assert gptq[name]["output_rel_error"] < rows[name]["output_rel_error"]


def test_samples_are_the_models_greedy_continuations(tiny, tmp_path):
    from gptq_explorer.metrics import SAMPLE_PROMPTS, generate_samples

    rep = run(tmp_path, tiny, "--method", "fp", "--eval", "", "--samples", "--sample-tokens", "4")
    assert list(rep["samples"]) == list(SAMPLE_PROMPTS)
    loaded = load_model(tiny)
    assert rep["samples"] == generate_samples(loaded.model, loaded.tokenizer, max_new_tokens=4)
    assert all(len(loaded.tokenizer(t)["input_ids"]) >= 1 for t in rep["samples"].values())
    assert "samples" not in run(tmp_path, tiny, "--method", "fp", "--eval", "", name="no-samples")


# ------------------------------------------------------------------ --override


def test_override_parsing():
    got = cli._parse_override("blocks.0.*:bits=8,group-size=64")
    assert got == ("blocks.0.*", {"bits": 8, "group_size": 64})
    assert cli._parse_override("*.down_proj:sym=false,damp_percent=0.1") == (
        "*.down_proj", {"sym": False, "damp_percent": 0.1})  # fmt: skip
    merged = cli._merge_overrides([("a", {"bits": 8}), ("b", {"bits": 2}), ("a", {"group_size": 64})])
    assert merged == {"a": {"bits": 8, "group_size": 64}, "b": {"bits": 2}}
    assert list(merged) == ["a", "b"]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("blocks.0.*", "PATTERN:field=value"),
        ("blocks.0.*:bits", "field=value"),
        ("blocks.0.*:bits=eight", "bits='eight' must be an integer"),
        ("blocks.0.*:sym=maybe", "must be true/false"),
        ("blocks.0.*:colour=red", "unknown field 'colour'"),
    ],
)
def test_override_syntax_errors_exit_2(tiny, capsys, text, needle):
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--model", tiny, "--override", text])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_override_applies_per_layer(tiny, tmp_path):
    rep = run(tmp_path, tiny, "--method", "rtn", "--bits", "3", "--group-size", "32", "--eval", "",
              "--override", "blocks.0.*:bits=8", "--override", "blocks.-1.*:group_size=16",
              "--override", "blocks.0.*:group_size=64")  # fmt: skip
    got = {(r["block"], r["bits"], r["group_size"]) for r in rep["layers"]}
    assert got == {(0, 8, 64), (1, 3, 16)}
    want = {"blocks.0.*": {"bits": 8, "group_size": 64}, "blocks.-1.*": {"group_size": 16}}
    assert rep["overrides"] == want
    assert rep["perplexity"] == {}


def test_override_matching_nothing_exits_2(tiny, capsys):
    rc = cli.main(["quantize", "--model", tiny, *FAST, "--method", "rtn", "--override", "blocks.7.*:bits=8"])
    assert rc == 2
    assert "matches no quantized layer" in capsys.readouterr().err


# ------------------------------------------------------------------ --save


def test_save_reloads_with_equal_logits(tiny, tmp_path, monkeypatch):
    kept = {}
    real = qmod.quantize_model

    def keep(*args, **kwargs):  # the real quantizer; we only keep its result to compare with
        kept["qm"] = real(*args, **kwargs)
        return kept["qm"]

    monkeypatch.setattr(qmod, "quantize_model", keep)
    folder = tmp_path / "ckpt"
    rep = run(tmp_path, tiny, "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym",
              "--eval", "prose", "--save", str(folder))  # fmt: skip
    assert rep["export"]["folder"] == str(folder) and rep["export"]["format"] == "gptq_v2"
    assert "quantized linears" in rep["export"]["summary"]
    qm = kept["qm"]
    ckpt = load_quantized(folder)
    assert set(ckpt.layers) == set(qm.results)
    # what a checkpoint can hold: the in-memory weights rebuilt from fp16 scales
    ref = copy.deepcopy(qm.model)
    for name, res in qm.results.items():
        g = res.g_idx.long()
        W = res.scales.half().float()[:, g] * (res.codes.float() - res.zeros.float()[:, g])
        set_weight(ref.get_submodule(name), W)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, mem = ckpt.model(ids).logits, ref(ids).logits, qm.model(ids).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(got, mem, atol=2e-3, rtol=0)
    assert ckpt.tokenizer is not None and ckpt.tokenizer.decode(ckpt.tokenizer("abc")["input_ids"]) == "abc"


# ------------------------------------------------------------------ bad arguments: exit 2, name the fix


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--bits", "9"], "bits must be between 2 and 8"),
        (["--group-size", "0"], "group_size must be -1"),
        (["--damp", "2"], "damp_percent must be strictly between 0 and 1"),
        (["--nsamples", "0"], "--nsamples 0: nsamples must be a positive number of windows"),
        (["--eval-tokens", "10"], "give --eval-tokens >= 64"),
        (["--method", "fp", "--save", "somewhere"], "--save needs --method rtn or gptq"),
        (["--method", "fp", "--override", "blocks.0.*:bits=8"], "--override needs --method rtn or gptq"),
        pytest.param(["--device", "cuda"], "use --device cpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--method", "gptq", "--rtn-calib"], "--rtn-calib is for --method rtn"),
        (["--samples", "--sample-tokens", "0"], "--sample-tokens must be at least 1"),
        (["--eval", "no-such-corpus.txt"], "does not exist"),
        (["--calib", "no-such-file.txt"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2(tiny, capsys, extra, needle):
    rc = cli.main(["quantize", "--model", tiny, *FAST, *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gptq-explorer: error:" in err and needle in err, err


def test_unknown_model_exits_2(tmp_path, capsys):
    assert cli.main(["quantize", "--model", str(tmp_path / "nothing-here"), *FAST]) == 2
    assert "gptq-explorer: error:" in capsys.readouterr().err


def test_existing_outputs_are_refused_before_work(tiny, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert cli.main(["quantize", "--model", tiny, *FAST, "--method", "rtn", "--save", str(full)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"
    assert cli.main(["quantize", "--model", tiny, *FAST, "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--method", "awq"])
    assert exc.value.code == 2 and "invalid choice: 'awq'" in capsys.readouterr().err


def test_prepare_check_says_whether_the_offline_model_is_converted(tmp_path, monkeypatch, capsys):
    from gptq_explorer.models.cache_folders import cache_folder_complete, smollm2_cache_dir

    monkeypatch.setenv("GPTQ_EXPLORER_CACHE", str(tmp_path))
    assert cli.main(["prepare", "--check"]) == 1  # an empty cache: nothing converted, nothing loaded
    assert "not converted yet" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
    monkeypatch.delenv("GPTQ_EXPLORER_CACHE")
    from gptq_explorer.services import layer_store
    from gptq_explorer.services.layer_source import ModelSource

    # ready: converted, and the first layer in the store (when the store is on) and sound
    ready = cache_folder_complete(smollm2_cache_dir()) and (
        not layer_store.enabled() or layer_store.read(ModelSource().store_key()) is not None)
    assert cli.main(["prepare", "--check"]) == (0 if ready else 1)
