"""The meta-learner on a small store of real quick-zoo runs: learn, recommend, explain, persist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench.errors import WorkbenchError
from workbench.meta import evaluate, features, persist
from workbench.meta.learner import Budget, MetaLearner
from workbench.meta.recommend import recommend, train
from workbench.store import Store

UNSEEN_MODEL = "zoo:code-wide"  # never in the training store


def _spec(model: str, workload: str, technique: str, params: dict | None = None, draft: str | None = None):
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec

    return RunSpec(ModelSpec(model), WorkloadSpec(workload, max_items=2, max_new_tokens=8),
                   TechniqueSpec(technique, params or {}, ModelSpec(draft) if draft else None),
                   repeats=2, warmup=1)


@pytest.fixture(scope="module")
def meta_store(quick_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store of real runs: two models, two workloads, lossy and lossless techniques."""
    from workbench import runner
    from workbench.store import Store

    url = f"sqlite:///{tmp_path_factory.mktemp('meta') / 'runs.sqlite'}"
    store = Store(url)
    for spec in (
        _spec("zoo:code-target", "code-prompts", "quantization"),
        _spec("zoo:code-target", "code-prompts", "speculative", {"prompt_lookup_num_tokens": 3}),
        _spec("zoo:code-target", "code-prompts", "speculative", draft="zoo:code-draft"),
        _spec("zoo:code-target", "code-prompts", "early_exit"),
        _spec("zoo:code-classifier", "code-snippets", "quantization"),
    ):
        result = runner.run(spec, store=store, progress=False)
        assert result.status == "ok", result.failure_reason
    return url


@pytest.fixture(scope="module")
def runs(meta_store: str) -> pd.DataFrame:
    from workbench.store import Store

    return Store(meta_store).runs()


def test_features_follow_the_schema(runs: pd.DataFrame) -> None:
    table = features.run_features(runs)
    assert len(table) == 5
    assert set(features.FEATURE_NAMES) <= set(table.columns)
    assert set(table["configuration"]) == {"quantization", "speculative[prompt_lookup_num_tokens=3]",
                                           "speculative[draft=zoo:code-draft]", "early_exit"}
    assert (table["baseline_seconds"] > 0).all() and (table["work_units"] > 0).all()  # what a run cost
    speculative = table[table["technique"] == "speculative"]
    assert speculative["lossless"].all() and not table[table["technique"] == "quantization"]["lossless"].any()
    drafted = speculative[speculative["configuration"].str.contains("draft=")]
    assert 0 < drafted["draft_cost_ratio"].iloc[0] < 1  # the draft is smaller than the target
    # quality in each modality's unit: lossless speculation loses nothing; quantization has a perplexity change
    assert (table.loc[table["lossless"], "quality_loss"] == 0).all() and table["quality_loss"].notna().all()
    assert features.repeated_ngram_fraction(["a b c a b c"]) == 0.5
    assert features.schema_table()["name"].tolist() == list(features.FEATURE_NAMES)


def test_runs_on_a_noisy_machine_count_less(runs: pd.DataFrame) -> None:
    calm = runs.copy()
    calm["noisy"] = False  # the fixture's own runs may have been flagged (pytest -n runs files side by side)
    quiet = features.run_features(calm)
    flagged = calm.copy()
    flagged["noisy"] = [True] + [False] * (len(flagged) - 1)
    noisy = features.run_features(flagged)
    first = flagged["run_id"].iloc[0]
    se = {name: frame.set_index("run_id").loc[first, "log_speedup_se"] for name, frame in (("quiet", quiet),
                                                                                           ("noisy", noisy))}
    assert se["noisy"] == pytest.approx(features.NOISY_SE_FACTOR * se["quiet"])
    table = features.training_table(noisy)
    weights = dict(zip(table["run_ids"].map(tuple), table["weight"]))
    assert weights[(first,)] == features.NOISY_WEIGHT and set(weights.values()) == {1.0, features.NOISY_WEIGHT}
    fitted = MetaLearner(learner="tree", random_state=0).fit(table, table["log_speedup"], table["quality_loss"])
    assert np.isfinite(fitted.predict(table)).all()  # the weight column is used as sample weight


def test_budget_parsing_names_the_bad_value() -> None:
    budget = Budget.parse("perplexity<=2%, accuracy<=0.5, ssim>=0.95")
    assert budget.bound("text-generation") == 2.0 and budget.bound("text-classification") == 0.5
    assert budget.bound("image-generation") == pytest.approx(0.05)
    assert budget.allows(False, 1.9, "text-generation") and not budget.allows(False, 2.1, "text-generation")
    assert not budget.allows(False, float("nan"), "text-generation")  # an unknown loss never fits
    assert budget.allows(True, float("nan"), "text-generation")  # lossless always does
    only_accuracy = Budget.parse("accuracy<=1")
    assert only_accuracy.bound("text-generation") == 2.0  # the modality it does not name keeps its default
    assert "perplexity<=2%" in only_accuracy.describe() and "by default" in only_accuracy.describe()
    assert Budget.parse("lossless").lossless and Budget.parse("any").allows(False, float("nan"), "text-generation")
    with pytest.raises(WorkbenchError, match="'fast'.*lossless"):
        Budget.parse("fast")
    with pytest.raises(WorkbenchError, match="points.*retired.*perplexity<=2%"):
        Budget.parse("loss<=2")  # the old 0-100 points scale
    with pytest.raises(WorkbenchError, match="ssim<=0.9.*floor"):
        Budget.parse("ssim<=0.9")


def test_learner_is_sklearn_style(runs: pd.DataFrame) -> None:
    table = features.training_table(features.run_features(runs))
    learner = MetaLearner(learner="tree", random_state=0)
    assert learner.fit(table, table["log_speedup"], table["quality_loss"]) is learner
    low, high = learner.predict_interval(table)
    point = learner.predict(table)
    assert np.all(low <= point) and np.all(point <= high)
    assert "log speedup" in learner.rules()
    with pytest.raises(WorkbenchError, match="learner='forest'"):
        MetaLearner(learner="forest").fit(table, table["log_speedup"])


def test_evaluation_table_has_learners_and_baselines(runs: pd.DataFrame) -> None:
    table = features.training_table(features.run_features(runs))
    results = evaluate.evaluate(table, Budget.parse("accuracy<=1"))
    policies = set(results["policy"])
    assert {"meta-learner (boosting)", "meta-learner (tree)", "random", "best_on_average", "expert_rules"} <= policies
    by_model = results[results["grouping"] == "model"]
    assert by_model["top1_accuracy"].between(0, 1).all()
    assert (by_model["top1_within_noise"] >= by_model["top1_accuracy"]).all()  # ties with the oracle count too
    machine = results[results["grouping"] == "machine_id"]
    assert machine["note"].str.contains("only one machine").all()


def test_learn_command_prints_the_table(meta_store: str, tmp_path: Path, cli_env: dict, workbench_cmd: list) -> None:
    out = tmp_path / "learner.skops"
    done = subprocess.run([*workbench_cmd, "learn", "--store", meta_store, "--out", str(out)], env=cli_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "leave-one-group-out" in text and "top1_accuracy" in text and "expert_rules" in text
    assert "only one machine" in text and "anchor (not measured here)" in text
    assert "does not beat every baseline" in text or "beats every baseline" in text
    assert "gap_closed" in text and "interval_coverage" in text
    assert "leaving one model out: meta-learner (boosting)" in text  # the gap closed, in words
    assert out.is_file()
    default = subprocess.run([*workbench_cmd, "learn", "--store", meta_store], env=cli_env, capture_output=True,
                             text=True, timeout=300)
    assert default.returncode == 0, default.stderr
    beside = Path(meta_store.removeprefix("sqlite:///")).with_name("runs.learner.skops")
    assert beside.is_file() and str(beside) in default.stdout  # beside the store it learned from


def test_learn_on_an_empty_store_says_what_to_do(tmp_path: Path, cli_env: dict, workbench_cmd: list) -> None:
    Store(f"sqlite:///{tmp_path / 'empty.sqlite'}").close()  # a store with no runs (a missing one is refused)
    done = subprocess.run([*workbench_cmd, "learn", "--store", f"sqlite:///{tmp_path / 'empty.sqlite'}",
                           "--out", str(tmp_path / "l.skops")], env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "no stored runs to learn from" in done.stderr and "workbench import" in done.stderr


def test_recommend_for_an_unseen_model(meta_store: str, runs: pd.DataFrame, tmp_path: Path, cli_env: dict,
                                       workbench_cmd: list) -> None:
    path = persist.save(train(runs), tmp_path / "learner.skops")
    assert UNSEEN_MODEL not in set(runs["model"])
    done = subprocess.run([*workbench_cmd, "recommend", "--model", UNSEEN_MODEL, "--workload", "code-prompts",
                           "--learner-path", str(path), "--json"], env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["context"]["model"] == UNSEEN_MODEL
    assert result["configuration"]
    assert result["reasons"], "a recommendation explains itself"
    assert result["counterfactual"]["text"]
    assert result["fallback"] == (result["configuration"] == "baseline")
    assert {c["configuration"] for c in result["candidates"]} >= {"speculative[draft=zoo:code-draft]"}
    text = subprocess.run([*workbench_cmd, "recommend", "--model", UNSEEN_MODEL, "--workload", "code-prompts",
                           "--learner-path", str(path)], env=cli_env, capture_output=True, text=True, timeout=300)
    assert "recommendation:" in text.stdout and "counterfactual:" in text.stdout
    # 100 characters a line: prose wrapped, candidates by name with 3 significant figures
    assert all(len(line) <= 100 for line in text.stdout.splitlines()), max(text.stdout.splitlines(), key=len)
    lines = text.stdout.splitlines()
    table = lines[lines.index("candidates (predicted; lossless ones lose nothing by definition):") + 1:]
    assert table[0].split() == ["configuration", "in", "budget", "speedup", "(80%", "interval)", "perplexity",
                                "increase", "(%)"]
    assert any(row.startswith("speculative decoding (draft") for row in table)  # by name, not the stored key
    from typer.testing import CliRunner

    from workbench.cli import app

    wide = CliRunner().invoke(app, ["recommend", "--model", UNSEEN_MODEL, "--workload", "code-prompts",
                                    "--learner-path", str(path), "--wide"])
    assert wide.exit_code == 0, wide.output
    header = next(line for line in wide.output.splitlines() if line.split()[:2] == ["configuration", "allowed"])
    assert header.split()[2:5] == ["speedup", "low", "high"]  # the full table, stored keys and bounds apart
    assert any(len(line) > 100 for line in wide.output.splitlines())  # nothing wrapped


@pytest.mark.parametrize("kind", ["boosting", "tree"])
def test_lossless_budget_never_picks_a_lossy_technique(runs: pd.DataFrame, kind: str) -> None:
    learner = train(runs, learner=kind)
    measured = learner.training_table_.groupby("configuration")["quality_loss"].max()
    contexts = [features.context_for(UNSEEN_MODEL, "code-prompts")]
    contexts += [row for row in learner.training_table_.drop_duplicates("context").to_dict(orient="records")]
    for context in contexts:
        for min_speedup in (1.0, 0.0):  # 0.0: no fallback for lack of confidence, so a candidate is chosen
            result = recommend(learner, context, "lossless", min_speedup=min_speedup, min_low=min_speedup)
            if result.configuration == "baseline":
                continue
            technique = result.configuration.split("[")[0]
            assert features.is_lossless(technique, {}) and technique == "speculative", result.configuration
            assert measured[result.configuration] == 0.0  # identical outputs where it was measured
    unseen = recommend(learner, contexts[0], "lossless", min_speedup=0.0, min_low=0.0)
    assert unseen.configuration.startswith("speculative")
    assert "quantization" in set(recommend(learner, contexts[0], "any", min_speedup=0.0, min_low=0.0).candidates["configuration"])
    candidates = recommend(learner, contexts[0], "perplexity<=2%", min_speedup=0.0, min_low=0.0).candidates
    assert (candidates.loc[candidates["lossless"], "predicted_quality_loss"] == 0).all()  # lossless loses nothing
    assert set(candidates["modality"]) == {contexts[0]["modality"]}  # every loss carries its unit


def test_saved_learner_reloads_in_a_fresh_process(runs: pd.DataFrame, tmp_path: Path) -> None:
    import skops.io

    learner = train(runs, learner="boosting")
    path = persist.save(learner, tmp_path / "learner.skops")
    assert set(skops.io.get_untrusted_types(file=path)) <= set(persist.TRUSTED_TYPES)
    table = learner.training_table_
    expected = np.concatenate([learner.predict(table), *learner.predict_interval(table),
                               learner.predict_quality_loss(table)])
    code = ("import json, sys, numpy as np; from workbench.meta import persist; "
            f"m = persist.load({str(path)!r}); t = m.training_table_; "
            "v = np.concatenate([m.predict(t), *m.predict_interval(t), m.predict_quality_loss(t)]); "
            "print(json.dumps([float(x) for x in v])); print(json.dumps(m.provenance_))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[0]) == [float(x) for x in expected]
    provenance = json.loads(lines[1])
    assert sorted(provenance["run_ids"]) == sorted(runs["run_id"])
    assert provenance["machine_ids"] == sorted(runs["machine_id"].unique())


def test_load_refuses_what_is_not_a_learner(tmp_path: Path) -> None:
    bogus = tmp_path / "learner.skops"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(WorkbenchError, match="not a meta-learner file"):
        persist.load(bogus)
    with pytest.raises(WorkbenchError, match="workbench learn"):
        persist.load(tmp_path / "missing.skops")


def test_explain_writes_text_and_figures(runs: pd.DataFrame, tmp_path: Path, cli_env: dict,
                                         workbench_cmd: list) -> None:
    path = persist.save(train(runs, learner="tree"), tmp_path / "tree.skops")
    html = tmp_path / "explain.html"
    done = subprocess.run([*workbench_cmd, "explain", "--learner-path", str(path), "--html", str(html)],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "permutation importance" in done.stdout and "rules of the glass-box tree" in done.stdout
    assert "plotly" in html.read_text()


def test_prior_is_the_shrunk_configuration_mean(runs: pd.DataFrame) -> None:
    table = features.training_table(features.run_features(runs))
    learner = MetaLearner(random_state=0, prior_strength=2.0).fit(table, table["log_speedup"],
                                                                   table["quality_loss"])
    y, levels = table["log_speedup"], learner.speed_prior_["levels"]
    overall = y.mean()

    def shrunk(rows: pd.DataFrame, parent: float) -> float:
        return (rows["log_speedup"].sum() + 2.0 * parent) / (len(rows) + 2.0)

    for technique, rows in table.groupby("technique"):
        tech = shrunk(rows, overall)
        assert levels["technique"]["mean"][technique] == pytest.approx(tech)
        for modality, mrows in rows.groupby("modality"):
            mod_tech = shrunk(mrows, tech)
            assert levels["modality_technique"]["mean"][f"{modality}|{technique}"] == pytest.approx(mod_tech)
            for configuration, crows in mrows.groupby("configuration"):
                key = f"{modality}|{configuration}"
                assert levels["modality_configuration"]["mean"][key] == pytest.approx(shrunk(crows, mod_tech))
    measured = table.iloc[[0]]
    assert learner.novelty_of(measured).tolist() == [0.0]  # measured on this modality: nothing backed off
    # Backing off: a new configuration of a known technique on a known modality, a known configuration on
    # a modality it never ran on, an unknown technique; each knows less, so its interval widens.
    unseen = table[table["technique"] == "quantization"].iloc[[0, 0, 0]].copy()
    unseen["configuration"] = ["quantization[scheme=int4-weight-only]", "quantization", "pruning"]
    unseen["modality"] = [unseen["modality"].iloc[0], "image-generation", unseen["modality"].iloc[0]]
    unseen["technique"] = ["quantization", "quantization", "pruning"]
    modality = unseen["modality"].iloc[0]
    assert learner.prior_of(unseen).tolist() == pytest.approx([
        levels["modality_technique"]["mean"][f"{modality}|quantization"],
        levels["technique"]["mean"]["quantization"], overall])
    assert (learner.novelty_of(unseen) > 0).all()
    low, high = learner.predict_interval(unseen)
    z = 1.2815515655446004  # the 90% normal quantile: quantile=0.1
    assert np.all(high - low >= 2 * z * learner.novelty_of(unseen) - 1e-9)
    plain = MetaLearner(prior="none").fit(table, y)
    assert plain.prior_of(table).tolist() == [0.0] * len(table)
    with pytest.raises(WorkbenchError, match="prior='mean'"):
        MetaLearner(prior="mean").fit(table, y)


def test_seed_learner_reports_the_gap_it_closes(tmp_path: Path, cli_env: dict, workbench_cmd: list) -> None:
    """The issue's acceptance on the shipped seed: import it, `workbench learn`; the gap closed is printed
    per grouping, and each verdict says plainly whether it meets the 70% target or by how much it falls short.
    The glass-box tree keeps this within the test budget (the boosting learner's evaluation of the seed
    takes about 2.5 minutes: its figures are in data/seed/README.md, from `workbench learn`)."""
    import re

    seed = Path(__file__).resolve().parents[1] / "data" / "seed" / "runs.parquet"
    store = f"sqlite:///{tmp_path / 'seed.sqlite'}"
    imported = subprocess.run([*workbench_cmd, "import", str(seed), "--store", store], env=cli_env,
                              capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    done = subprocess.run([*workbench_cmd, "learn", "--store", store, "--learner", "tree"], env=cli_env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "seed.learner.skops").is_file()  # beside the store it learned from, not in the checkout
    verdicts = {m.group(1): (float(m.group(2)), m.group(3)) for m in re.finditer(
        r"leaving one (model|workload|hardware) out: meta-learner \(tree\) closes (-?\d+)% of the "
        r"single-best-to-oracle gap, (meets the 70% target|falls short of the 70% target by \d+ points)", done.stdout)}
    assert set(verdicts) == {"model", "workload", "hardware"}, done.stdout
    for grouping, (percent, verdict) in verdicts.items():
        if percent >= 70:
            assert verdict.startswith("meets"), grouping
        else:
            short = int(re.search(r"by (\d+) points", verdict).group(1))
            assert abs(short - (70 - percent)) <= 1, (grouping, percent, verdict)
    assert "leaving one machine out: meta-learner (tree) gap closed n/a" in done.stdout  # one machine only
    table = done.stdout.split("gap closed (ASlib")[0]
    coverage = [float(x) for x in re.findall(r"meta-learner \(tree\)\s+(?:\S+\s+){5}(\d\.\d{3})", table)]
    assert len(coverage) == 3 and all(0.0 <= c <= 1.0 for c in coverage), table


def test_pooling_weights_runs_by_their_precision(runs: pd.DataFrame) -> None:
    # a quiet run (narrow interval) outweighs a stalled one (wide interval); no intervals: the median
    value, se = features.pool_log_speedups([np.log(1.3), np.log(4.7)], [0.02, 0.43])
    assert np.exp(value) == pytest.approx(1.3, rel=0.01) and se < 0.02
    assert features.pool_log_speedups([0.1, 0.2, 0.9], [np.nan] * 3)[0] == pytest.approx(0.2)
    table = features.training_table(features.run_features(runs))
    assert (table["log_speedup_se"] > 0).all()  # every stored run has its bootstrap interval


# ----------------------------------------------------------------------------------------------------
# trust: the gap closed, interval coverage, applicable candidates, what to measure next, reasons
# ----------------------------------------------------------------------------------------------------


def test_gap_closed_and_interval_coverage_are_computed_correctly(runs: pd.DataFrame) -> None:
    # 1. By hand, on numbers whose answer is known.
    policy = pd.DataFrame({"context": ["a", "b", "c"], "achieved": [2.0, 1.0, 1.5], "oracle": [2.0, 1.5, 1.5]})
    single = pd.DataFrame({"context": ["a", "b", "c"], "achieved": [1.0, 1.0, 1.5], "oracle": [2.0, 1.5, 1.5]})
    assert evaluate.gap_closed(policy, single) == pytest.approx((1.5 - 7 / 6) / (5 / 3 - 7 / 6))  # 2/3
    assert evaluate.gap_closed(single, single) == 0.0
    assert np.isnan(evaluate.gap_closed(single.assign(oracle=single["achieved"]), single))  # no gap to close
    assert evaluate.interval_coverage(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.5, 3.0, 5.0]),
                                      np.array([1.0, 3.0, 3.5, 6.0])) == 0.5
    # 2. evaluate()'s coverage is that of the intervals a user is shown (predict_frame, widened out of
    # range), over every measured configuration of every held-out group, recomputed here fold by fold.
    table = features.training_table(features.run_features(runs))
    results = evaluate.evaluate(table, Budget.parse("any"), learners=("boosting",), groupings=("model",))
    learner_row = results[results["policy"] == "meta-learner (boosting)"].iloc[0]
    hits = []
    for model in table["model"].unique():
        train_, test_ = table[table["model"] != model], table[table["model"] == model]
        if len(train_) < 2:  # nothing to learn from: evaluate() fits no learner for this fold either
            continue
        fitted = MetaLearner(random_state=0).fit(train_[list(features.FEATURE_NAMES)], train_["log_speedup"],
                                                 train_["quality_loss"], train_["weight"])
        frame = fitted.predict_frame(test_[list(features.FEATURE_NAMES)])
        measured = np.exp(test_["log_speedup"].to_numpy())
        hits += list((measured >= frame["speedup_low"] * (1 - 1e-9)) & (measured <= frame["speedup_high"] * (1 + 1e-9)))
    assert learner_row["interval_coverage"] == pytest.approx(np.mean(hits))
    assert -np.inf < learner_row["gap_closed"] < np.inf or np.isnan(learner_row["gap_closed"])
    per_group = evaluate.gap_closed_by_group(results)
    assert set(per_group["group"]) == set(table["model"]) and set(per_group["policy"]) >= {"best_on_average"}
    assert (per_group.loc[per_group["policy"] == "best_on_average", "gap_closed"].fillna(0) == 0).all()


def _model_with_its_own_tokenizer(folder: Path, family: str) -> Path:
    """A tiny causal LM of ``family`` whose BPE tokenizer was trained here on English text (not code):
    nothing the seed measured shares its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    text = ["The quick brown fox jumps over the lazy dog near the river bank."] * 40 + \
           ["Pack my box with five dozen liquor jugs, said the sphinx of black quartz."] * 40
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        pad_token="<pad>")
    size = len(tokenizer)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=size, n_layer=2, n_embd=32, n_head=2, n_positions=1024,
                                           bos_token_id=0, eos_token_id=0, pad_token_id=1))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=size, num_hidden_layers=2, hidden_size=32,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                                                 pad_token_id=1))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_recommend_never_offers_what_cannot_run(runs: pd.DataFrame, tmp_path: Path, cli_env: dict,
                                                workbench_cmd: list) -> None:
    from workbench.meta.commands import recommend_for

    learner = persist.save(train(runs), tmp_path / "learner.skops")
    gpt2 = _model_with_its_own_tokenizer(tmp_path / "gpt2-english", "gpt2")
    neox = _model_with_its_own_tokenizer(tmp_path / "neox-english", "gpt_neox")
    # 1. Another tokenizer: the zoo's draft is refused with the reason, never scored; what applies is.
    done = subprocess.run([*workbench_cmd, "recommend", "--model", str(gpt2), "--workload", "code-prompts",
                           "--max-items", "2", "--learner-path", str(learner), "--json"], env=cli_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    offered = {c["configuration"] for c in result["candidates"]}
    refused = {r["configuration"]: r["reason"] for r in result["inapplicable"]}
    assert "speculative[draft=zoo:code-draft]" in refused and "tokenizer" in refused["speculative[draft=zoo:code-draft]"]
    assert not any("draft=" in c for c in offered) and result["configuration"] not in refused
    assert {"speculative[prompt_lookup_num_tokens=3]", "early_exit"} <= offered  # GPT-2: early exit runs
    assert result["out_of_range"], "a 2-layer English GPT-2 is outside what one zoo LM taught the learner"
    # 2. An architecture early exit refuses (GPT-NeoX), and a batch speculative decoding refuses.
    neox_result = recommend_for(str(neox), "code-prompts", learner_path=learner, max_items=2)
    assert "early_exit" in set(neox_result.inapplicable["configuration"])
    assert "early_exit" not in set(neox_result.candidates["configuration"])
    assert "GPT-NeoX" in neox_result.inapplicable.set_index("configuration").loc["early_exit", "reason"] or \
        "gpt_neox" in neox_result.inapplicable.set_index("configuration").loc["early_exit", "reason"]
    batched = recommend_for("zoo:code-wide", "code-prompts", learner_path=learner, max_items=4, batch_size=2)
    assert not batched.candidates["configuration"].str.startswith("speculative").any()
    assert "batch" in " ".join(batched.inapplicable["reason"])
    assert "not applicable here" in batched.text()


def test_recommend_plan_writes_a_sweep_that_runs(runs: pd.DataFrame, tmp_path: Path, cli_env: dict,
                                                 workbench_cmd: list) -> None:
    from workbench.store import Store
    from workbench.sweep import read_sweep

    learner = persist.save(train(runs), tmp_path / "learner.skops")
    plan = tmp_path / "decide.yaml"
    done = subprocess.run([*workbench_cmd, "recommend", "--model", UNSEEN_MODEL, "--workload", "code-prompts",
                           "--max-items", "2", "--max-new-tokens", "8", "--learner-path", str(learner),
                           "--plan", str(plan), "--json"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["next_runs"], "five runs on one model leave overlapping intervals: something to measure"
    assert all(run["minutes"] > 0 and run["why"] for run in result["next_runs"])
    assert str(plan) in result["plan_note"]
    sweep = read_sweep(plan)
    assert [s.technique.name for s in sweep.specs] == [r["technique"] for r in result["next_runs"]]
    assert {s.model.name for s in sweep.specs} == {UNSEEN_MODEL} and {s.workload.max_items for s in sweep.specs} == {2}
    store = f"sqlite:///{tmp_path / 'decided.sqlite'}"
    ran = subprocess.run([*workbench_cmd, "sweep", str(plan), "--store", store], env=cli_env, capture_output=True,
                         text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-2000:]
    stored = Store(store).runs()
    assert len(stored) == len(result["next_runs"]) and set(stored["status"]) <= {"ok", "skipped"}
    # Reasons a person reads: the first says the prediction and its drivers; nothing 'n/a'.
    assert result["reasons"] and " is predicted " in result["reasons"][0]
    assert not any("n/a" in reason for reason in result["reasons"])
    bad = subprocess.run([*workbench_cmd, "recommend", "--model", UNSEEN_MODEL, "--workload", "code-prompts",
                          "--learner-path", str(learner), "--plan", str(tmp_path)], env=cli_env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is a folder" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_counterfactual_finds_the_observed_change_that_flips_it(runs: pd.DataFrame) -> None:
    """Prompt lookup wins at batch 1 and int8 at batch 16 in the training runs: the counterfactual of the
    batch-1 recommendation must find batch 16, a value the training runs observed."""
    table = features.training_table(features.run_features(runs))
    template = table[table["configuration"].isin(["speculative[prompt_lookup_num_tokens=3]", "quantization"])
                     & (table["modality"] == "text-generation")]
    rows = []
    rng = np.random.default_rng(0)
    for batch in (1.0, 16.0):
        for copy in range(8):  # several contexts per batch size, so that the trees can split on it
            for _, row in template.iterrows():
                lookup = row["technique"] == "speculative"
                fast = (batch == 1.0) == lookup
                rows.append({**row.to_dict(), "batch_size": batch, "prompt_chars_mean": 100.0 + copy,
                             "context": f"ctx-{batch:g}-{copy}", "quality_loss": 0.0,
                             "log_speedup": float(np.log(1.6 if fast else 0.8) + rng.normal(0, 0.01))})
    synthetic = pd.DataFrame(rows)
    learner = MetaLearner(learner="tree", random_state=0).fit(synthetic, synthetic["log_speedup"],
                                                              synthetic["quality_loss"])
    learner.candidates_ = features.candidates(synthetic).to_dict(orient="records")
    learner.training_table_ = synthetic
    context = synthetic[synthetic["batch_size"] == 1.0].iloc[0].to_dict()
    result = recommend(learner, context, "any", min_speedup=1.0, min_low=0.0)
    assert result.configuration == "speculative[prompt_lookup_num_tokens=3]", result.candidates[["configuration", "predicted_speedup", "speedup_low"]].to_string()
    flip = result.counterfactual
    assert flip["flips"] and flip["feature"] == "batch_size" and flip["to"] == 16.0 and flip["within_observed_range"], flip
    assert flip["new_recommendation"] == "quantization" and "batch size were 16" in flip["text"]
    assert " is predicted " in result.reasons[0] and "batches of 1" in " ".join(result.reasons)
