"""GLUE loading (on the real TSV files beside the checkout) and the GLUE metrics against hand-checked values."""
import csv
from pathlib import Path

import numpy as np
import pytest

from fusednoise.experiments import glue
from fusednoise.experiments.glue import compute_metrics, get_task, load_glue, tokenize

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="needs ../shared/data/glue")

# Rows of the files in ../shared/data/glue (header excluded). They match the hub's GLUE except MRPC's train
# file, which holds 3667 pairs (the hub's train split has 3668).
ROWS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3667, 408), "rte": (2490, 277), "stsb": (5749, 1500)}


def _raw_rows(task: str, split: str):
    """The file read with the standard library alone: an independent check of the datasets-based loader."""
    spec = get_task(task)
    path = GLUE_DIR / spec.folder / f"{split}.tsv"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "cola":
        return [{"label": r[1], "sentence": r[3]} for r in rows]
    header, body = rows[0], rows[1:]
    return [dict(zip(header, r)) for r in body]


@needs_glue
@pytest.mark.parametrize("task", sorted(ROWS))
def test_row_counts_and_schema(task):
    splits = load_glue(task, GLUE_DIR)
    spec = get_task(task)
    assert (len(splits["train"]), len(splits["validation"])) == ROWS[task]
    assert set(splits["train"].column_names) == {*spec.text_columns, "label"}
    assert len(_raw_rows(task, "dev")) == ROWS[task][1]


@needs_glue
def test_rte_labels_map_as_the_hub_does():
    splits = load_glue("rte", GLUE_DIR)
    raw = _raw_rows("rte", "dev")
    expected = [{"entailment": 0, "not_entailment": 1}[r["label"]] for r in raw]
    assert splits["validation"]["label"] == expected
    assert splits["validation"][0]["sentence2"] == "Christopher Reeve had an accident."
    assert splits["validation"][0]["label"] == 1  # not_entailment
    assert 0 < sum(expected) < len(expected)


@needs_glue
def test_cola_has_no_header_and_keeps_every_row():
    splits = load_glue("cola", GLUE_DIR)
    first = splits["train"][0]
    assert first == {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1}
    raw = _raw_rows("cola", "dev")
    assert splits["validation"]["label"] == [int(r["label"]) for r in raw]
    assert splits["validation"]["sentence"] == [r["sentence"] for r in raw]


@needs_glue
def test_mrpc_keeps_quotes_and_reads_past_the_byte_order_mark():
    splits = load_glue("mrpc", GLUE_DIR)
    first = splits["validation"][0]
    assert first["label"] == 1
    assert first["sentence2"] == '" The foodservice pie business does not fit our long-term growth strategy .'
    raw = _raw_rows("mrpc", "train")
    assert splits["train"]["sentence1"] == [r["#1 String"] for r in raw]
    assert splits["train"]["label"] == [int(r["Quality"]) for r in raw]


@needs_glue
def test_stsb_is_regression_with_float_scores():
    spec = get_task("STS-B")
    assert spec.name == "stsb" and spec.is_regression and spec.num_labels == 1
    splits = load_glue("stsb", GLUE_DIR)
    assert splits["train"].features["label"].dtype == "float32"
    scores = np.array(splits["validation"]["label"])
    raw = np.array([float(r["score"]) for r in _raw_rows("stsb", "dev")])
    np.testing.assert_allclose(scores, raw, rtol=0, atol=1e-6)
    assert scores.min() == 0.0 and scores.max() == 5.0
    assert len(np.unique(scores)) > 20 and np.any(scores != np.round(scores))  # real-valued, not classes


@needs_glue
def test_sst2_sentences_that_look_like_missing_values_stay_strings():
    splits = load_glue("sst2", GLUE_DIR, max_train_samples=2000)
    assert all(isinstance(s, str) and s for s in splits["train"]["sentence"])
    assert set(splits["train"]["label"]) == {0, 1}


@needs_glue
def test_subsampling_is_fixed_by_data_seed_and_leaves_dev_whole():
    full = load_glue("rte", GLUE_DIR)
    a = load_glue("rte", GLUE_DIR, max_train_samples=100, data_seed=0)
    b = load_glue("rte", GLUE_DIR, max_train_samples=100, data_seed=0)
    c = load_glue("rte", GLUE_DIR, max_train_samples=100, data_seed=1)
    assert len(a["train"]) == 100 and len(a["validation"]) == 277
    assert a["train"]["sentence1"] == b["train"]["sentence1"]
    assert a["train"]["sentence1"] != c["train"]["sentence1"]
    assert set(a["train"]["sentence1"]) <= set(full["train"]["sentence1"])
    assert a["train"]["sentence1"] != full["train"]["sentence1"][:100]  # drawn, not the first 100
    small = load_glue("rte", GLUE_DIR, max_train_samples=10_000, max_eval_samples=50)
    assert len(small["train"]) == 2490 and len(small["validation"]) == 50


@needs_glue
def test_tokenize_truncates_pairs_and_keeps_labels():
    from fusednoise.experiments.models import load_classifier

    _, tokenizer = load_classifier(None, num_labels=2)
    splits = load_glue("rte", GLUE_DIR, max_train_samples=16)
    encoded = tokenize(splits, tokenizer, "rte", max_length=32)
    lengths = [len(ids) for ids in encoded["train"]["input_ids"]]
    assert max(lengths) == 32 and "token_type_ids" in encoded["train"].column_names
    assert set(encoded["train"]["token_type_ids"][0]) == {0, 1}  # a sentence pair
    assert encoded["train"]["label"] == splits["train"]["label"]
    with pytest.raises(ValueError, match="max_length"):
        tokenize(splits, tokenizer, "rte", max_length=4)


def test_loader_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        load_glue("mnli", tmp_path)
    with pytest.raises(FileNotFoundError, match="data_dir must hold GLUE's TSV layout"):
        load_glue("rte", tmp_path)
    with pytest.raises(ValueError, match="max_train_samples"):
        load_glue("rte", tmp_path, max_train_samples=0)
    with pytest.raises(ValueError, match="data_seed"):
        load_glue("rte", tmp_path, data_seed=-1)


def test_a_tsv_with_other_columns_is_refused(tmp_path):
    (tmp_path / "RTE").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "RTE" / f"{split}.tsv").write_text("a\tb\n1\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no column"):
        load_glue("rte", tmp_path)


def test_hub_loading_uses_nyu_mll_glue_and_normalises(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        split = datasets.Dataset.from_dict({"sentence1": ["a b", "c d"], "sentence2": ["e", "f"], "label": [0, 1],
                                            "idx": [0, 1]})
        return datasets.DatasetDict({"train": split, "validation": split, "test": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_glue("rte")
    assert calls == [("nyu-mll/glue", "rte")]
    assert set(splits) == {"train", "validation"}
    assert splits["train"].column_names == ["sentence1", "sentence2", "label"]

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_glue("cola")


# --------------------------------------------------------------------------------------------- metrics
def test_cola_matthews_correlation_by_hand():
    # TP 2, TN 2, FP 1, FN 1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    out = compute_metrics("cola", [1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0])
    assert out == {"matthews_correlation": pytest.approx(1 / 3)}
    assert compute_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0])["matthews_correlation"] == 0.0  # constant


def test_mrpc_f1_and_accuracy_by_hand():
    # TP 2, FP 1, FN 1, TN 1: F1 = 2*2 / (2*2 + 1 + 1) = 2/3; accuracy 3/5
    out = compute_metrics("mrpc", [1, 1, 0, 1, 0], [1, 1, 1, 0, 0])
    assert out == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.6)}


def test_accuracy_from_logits():
    logits = np.array([[2.0, 1.0], [0.1, 0.3], [5.0, -1.0], [0.0, 1.0]])  # argmax 0, 1, 0, 1
    assert compute_metrics("rte", logits, [0, 1, 1, 1]) == {"accuracy": pytest.approx(0.75)}
    assert compute_metrics("sst2", [1, 0], [1, 0]) == {"accuracy": 1.0}


def test_stsb_pearson_and_spearman_by_hand():
    # x - mean = (-1.5, -.5, .5, 1.5), y - mean = (-3.25, -1.25, .75, 3.75): r = 11.5 / sqrt(5 * 26.75)
    out = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0], [4.0]]), [2.0, 4.0, 6.0, 9.0])
    assert out["pearson"] == pytest.approx(11.5 / np.sqrt(5 * 26.75))
    assert out["spearmanr"] == pytest.approx(1.0)
    # ranks (1, 2, 4, 3) against (1, 2, 3, 4): 1 - 6 * 2 / (4 * 15) = 0.8
    assert compute_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 9.0, 6.0])["spearmanr"] == pytest.approx(0.8)
    assert compute_metrics("stsb", [3.0, 3.0, 3.0], [1.0, 2.0, 5.0]) == {"pearson": 0.0, "spearmanr": 0.0}


def test_metric_input_errors():
    with pytest.raises(ValueError, match="labels must be 1-d and as long"):
        compute_metrics("rte", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="one score per example"):
        compute_metrics("stsb", np.zeros((3, 2)), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="must not be empty"):
        compute_metrics("rte", [], [])


def test_task_names():
    assert get_task("SST-2").name == "sst2" and get_task("CoLA").name == "cola"
    assert sorted(glue.TASKS) == ["cola", "mrpc", "rte", "sst2", "stsb"]
    assert get_task("mrpc").main_metric == "f1" and get_task("stsb").main_metric == "pearson"
    with pytest.raises(TypeError, match="task"):
        get_task(3)
