"""Pure parts of `dvi bench speed`: aggregation with hand-computed numbers, task mapping, order, flags."""

import pytest

from common.core.prompts import spec_bench_task

from dvi.bench.speed import (
    ROW_FIELDS,
    RunRecord,
    SpeedSettings,
    aggregate,
    markdown_table,
    method_order,
    spec_bench_speedups,
)
from dvi.commands.bench_speed import parse_methods, parse_variants


def records():
    # prompt 0 is in task "A", prompt 1 in task "B".
    return [
        RunRecord("hf_ar", 0, "q0", "A", (1, 2, 3, 4), 2.0, 4),
        RunRecord("hf_ar", 1, "q1", "B", (5, 6), 0.5, 2),
        RunRecord("dvi", 0, "q0", "A", (1, 2, 3, 4), 1.0, 2),
        RunRecord("dvi", 1, "q1", "B", (5, 7), 0.5, 1),  # differs from hf_ar at the 2nd token
        RunRecord("hf_prompt_lookup", 0, "q0", "A", (1, 2, 3, 4), 4.0, 4),
        RunRecord("hf_prompt_lookup", 1, "q1", "B", (5, 6), 0.5, None),  # passes unknown
    ]


def test_aggregate_rows_by_hand():
    rows = aggregate(records())
    assert all(tuple(r) == ROW_FIELDS for r in rows)
    # overall first, then tasks in order of appearance; methods in order of appearance
    assert [(r["category"], r["method"]) for r in rows] == [
        (c, m) for c in ("overall", "A", "B") for m in ("hf_ar", "dvi", "hf_prompt_lookup")
    ]
    by = {(r["method"], r["category"]): r for r in rows}

    ref = by["hf_ar", "overall"]  # 6 tokens / 2.5 s = 2.4 tok/s; 6 tokens / 6 passes
    assert (ref["prompts"], ref["tokens"]) == (2, 6)
    assert ref["seconds"] == pytest.approx(2.5)
    assert ref["tokens_per_s"] == pytest.approx(2.4)
    assert ref["speedup_vs_hf_ar"] == pytest.approx(1.0)
    assert ref["tau"] == pytest.approx(1.0)
    assert ref["identical_to_ar"] == 1.0

    dvi = by["dvi", "overall"]  # 6 / 1.5 = 4.0 tok/s; 4.0 / 2.4 = 1.667; 6 tokens / 3 passes = 2.0
    assert dvi["tokens_per_s"] == pytest.approx(4.0)
    assert dvi["speedup_vs_hf_ar"] == pytest.approx(4.0 / 2.4)
    assert dvi["tau"] == pytest.approx(2.0)
    assert dvi["identical_to_ar"] == 0.5  # q0 equal, q1 not

    # per task, against hf_ar on the same task: A 4/1 vs 4/2 -> 2.0; B 2/0.5 vs 2/0.5 -> 1.0
    assert by["dvi", "A"]["speedup_vs_hf_ar"] == pytest.approx(2.0)
    assert by["dvi", "A"]["identical_to_ar"] == 1.0
    assert by["dvi", "B"]["speedup_vs_hf_ar"] == pytest.approx(1.0)
    assert by["dvi", "B"]["identical_to_ar"] == 0.0
    assert by["dvi", "B"]["tau"] == pytest.approx(2.0)  # 2 tokens / 1 pass

    pld = by["hf_prompt_lookup", "overall"]  # 6 / 4.5 = 1.333 tok/s; / 2.4 = 0.5556
    assert pld["speedup_vs_hf_ar"] == pytest.approx((6 / 4.5) / 2.4)
    assert pld["tau"] is None  # one prompt's passes unknown
    assert by["hf_prompt_lookup", "A"]["tau"] == pytest.approx(1.0)


def test_spec_bench_speedup_is_ratio_of_mean_per_prompt_speeds():
    s = spec_bench_speedups(records())
    # dvi per-prompt speeds 4/1 = 4, 2/0.5 = 4 -> mean 4; hf_ar 4/2 = 2, 2/0.5 = 4 -> mean 3
    assert s["dvi", "overall"] == pytest.approx(4 / 3)  # the ratio of totals gives 1.667 instead
    assert s["hf_ar", "overall"] == pytest.approx(1.0)
    assert s["dvi", "A"] == pytest.approx(2.0)


def test_aggregate_without_reference_leaves_ratios_empty():
    rows = aggregate([r for r in records() if r.method != "hf_ar"])
    assert all(r["speedup_vs_hf_ar"] is None and r["identical_to_ar"] is None for r in rows)
    assert "n/a" in markdown_table(rows)


def test_spec_bench_task_groups_mt_bench():
    for cat in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"):
        assert spec_bench_task(cat) == "multi_turn"
    for cat in ("translation", "summarization", "qa", "math_reasoning", "rag"):
        assert spec_bench_task(cat) == cat


def test_method_order_rotates_per_prompt():
    names = ["a", "b", "c"]
    assert [method_order(names, i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]
    ]


def test_flag_parsing_and_validation():
    assert parse_methods(" hf_ar, dvi ") == ("hf_ar", "dvi")
    assert parse_methods(None) is None
    assert parse_variants(["kl=runs/a", "rl = runs/b"]) == (("kl", "runs/a"), ("rl", "runs/b"))
    with pytest.raises(ValueError, match="NAME=ADAPTER_DIR"):
        parse_variants(["no_dir"])
    with pytest.raises(ValueError, match="comma-separated"):
        parse_methods("hf_ar,,dvi")
    with pytest.raises(ValueError, match="unknown method"):
        SpeedSettings(prompts="p", methods=("hf_ar", "eagle"))
    with pytest.raises(ValueError, match="must include hf_ar"):
        SpeedSettings(prompts="p", methods=("ar", "dvi"))
    with pytest.raises(ValueError, match="already a method"):
        SpeedSettings(prompts="p", variants=(("dvi", "x"),))
    with pytest.raises(ValueError, match="gamma"):
        SpeedSettings(prompts="p", gamma=0, context_tokens=0)  # no drafting at all: that is `ar`
    assert SpeedSettings(prompts="p", gamma=0, context_tokens=4).decode_config().context_tokens == 4  # context only
    with pytest.raises(ValueError, match="unknown schedule"):
        SpeedSettings(prompts="p", learn=("kl-only", "sgd"))
    with pytest.raises(ValueError, match="drop --held-out"):  # it would learn on held-out prompts
        SpeedSettings(prompts="p", learn=("kl-only",), held_out=True)
    learned = SpeedSettings(prompts="p", methods=("hf_ar", "dvi"), learn=("kl-only", "kl-rl"))
    assert learned.all_methods == ("hf_ar", "dvi", "dvi_kl-only", "dvi_kl-rl")  # dvi: the default drafter, frozen
    with pytest.raises(ValueError, match="dvi_context drafts from the context only"):
        SpeedSettings(prompts="p", methods=("hf_ar", "dvi_context"), context_tokens=0)
    settings = SpeedSettings(prompts="p", methods=("hf_ar", "dvi"), variants=(("dvi_kl_only", "x"),))
    assert settings.all_methods == ("hf_ar", "dvi", "dvi_kl_only")


def test_identity_references_compare_native_methods_with_our_own_ar():
    from dvi.bench.speed import identity_references

    methods = ["hf_ar", "ar", "hf_prompt_lookup", "dvi", "dvi_kl-only", "llama_cpp", "llama_cpp_lookup"]
    native = identity_references(methods, native=True)
    assert native == {"hf_ar": "hf_ar", "ar": "hf_ar", "hf_prompt_lookup": "hf_ar", "dvi": "ar",
                      "dvi_kl-only": "ar", "llama_cpp": "hf_ar", "llama_cpp_lookup": "llama_cpp"}
    assert identity_references(methods, native=False)["dvi"] == "hf_ar"
    assert identity_references(["hf_ar", "dvi"], native=True)["dvi"] == "hf_ar"  # no ar ran


def test_aggregate_compares_each_method_with_its_own_reference():
    recs = records() + [
        RunRecord("ar", 0, "q0", "A", (1, 2, 3, 9), 1.5, 4),
        RunRecord("ar", 1, "q1", "B", (5, 7), 0.5, 2),
    ]
    by = {(r["method"], r["category"]): r for r in aggregate(recs, identity={"dvi": "ar"})}
    assert by["dvi", "overall"]["identical_to_ar"] == 0.5  # q0 differs from ar, q1 equals it
    assert by["dvi", "B"]["identical_to_ar"] == 1.0
    assert by["ar", "overall"]["identical_to_ar"] == 0.0  # ar against hf_ar (no entry: the default)
    assert by["hf_prompt_lookup", "overall"]["identical_to_ar"] == 1.0


def test_peer_methods_are_accepted_but_not_default():
    from dvi.bench.peers import PEER_METHODS
    from dvi.bench.speed import BUILTIN_METHODS

    assert not set(PEER_METHODS) & set(BUILTIN_METHODS)
    settings = SpeedSettings(prompts="p.jsonl", methods=("hf_ar", "ar", "llama_cpp", "llama_cpp_lookup"))
    assert settings.all_methods == ("hf_ar", "ar", "llama_cpp", "llama_cpp_lookup")
    with pytest.raises(ValueError, match="weights"):
        SpeedSettings(prompts="p.jsonl", weights="int3")


def test_a_method_that_learns_from_traffic_forgets_its_warm_up_before_timing():
    from dvi.bench.speed import BenchPrompt, run_benchmark

    class Learning:
        """Fast on a prompt it has served before, as traffic drafting would be."""

        def __init__(self):
            self.seen, self.calls = set(), []

        def __call__(self, ids):
            self.calls.append(("served", tuple(ids), tuple(ids) in self.seen))
            self.seen.add(tuple(ids))
            return list(ids), 1

        def forget(self):
            self.calls.append(("forget",))
            self.seen.clear()

    method = Learning()
    prompts = [BenchPrompt(0, "q0", "A", (1, 2)), BenchPrompt(1, "q1", "A", (3, 4))]
    records = run_benchmark({"learning": method, "plain": lambda ids: (list(ids), 1)}, prompts, warmup=1)
    assert method.calls == [("served", (1, 2), False), ("forget",), ("served", (1, 2), False), ("served", (3, 4), False)]
    assert [(r.method, r.prompt_index) for r in records] == [("learning", 0), ("plain", 0), ("plain", 1), ("learning", 1)]


def test_our_decoders_forget_drops_the_traffic_index():
    from common.core.config import DecodeConfig
    from dvi.bench.speed import DecoderMethod
    from tests.tiny_models import tiny_split

    method = DecoderMethod(tiny_split(seed=1, exit_layer=1), DecodeConfig(gamma=0, max_new_tokens=6))
    method([4, 8, 15, 16, 4, 8])
    assert len(method.decoder.traffic) > 0
    config = method.decoder.traffic.config
    method.forget()
    assert len(method.decoder.traffic) == 0 and method.decoder.traffic.config == config
