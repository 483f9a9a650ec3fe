"""The run config's pre-trained transformer (``model = "hf-classifier"``): the built-in base
pre-trained on task A and cached, a user's model and text data set read from local folders
(what ``save_pretrained`` and ``save_to_disk`` write), and runs through ``strategy.start``."""

import json

import pytest
import torch

from fl_subnet.experiments import cli
from fl_subnet.experiments.config import RunConfig

BASE = {"model": "hf-classifier", "dataset": "shifted-majority", "num-samples": 300, "pretrain-steps": 20,
        "num-nodes": 3, "seed": 0}


def test_pretrained_base_is_cached_and_the_same_in_every_process(tmp_path, monkeypatch):
    from fl_subnet.experiments import hf_model, lora_task

    monkeypatch.setenv("FL_SUBNET_CACHE", str(tmp_path))
    hf_model.pretrained_state.cache_clear()
    first = hf_model.pretrained_state(0, 20)
    files = list(tmp_path.glob("pretrained-*.safetensors"))
    assert len(files) == 1
    hf_model.pretrained_state.cache_clear()
    calls = []
    monkeypatch.setattr(lora_task, "pretrain", lambda *a, **k: calls.append(a))
    again = hf_model.pretrained_state(0, 20)  # read from the file: no training
    assert not calls and all(torch.equal(first[k], again[k]) for k in first)
    # computed again on one thread (another process) it is the same bits
    monkeypatch.undo()
    monkeypatch.setenv("FL_SUBNET_CACHE", "off")
    hf_model.pretrained_state.cache_clear()
    fresh = hf_model.pretrained_state(0, 20)
    assert all(torch.equal(first[k], fresh[k]) for k in first)
    hf_model.pretrained_state.cache_clear()


def test_lora_rank_makes_only_adapters_and_head_trainable():
    from fl_subnet.core.frozen import trainable_keys
    from fl_subnet.experiments.experiment import factory_for

    lora = factory_for(RunConfig.from_mapping({**BASE, "lora-rank": 4}))()
    keys = trainable_keys(lora)
    assert keys and all(".lora_" in k or ".modules_to_save." in k for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k} == {"query", "value"}
    full = factory_for(RunConfig.from_mapping({**BASE, "lora-rank": 0}))()
    assert all(p.requires_grad for p in full.parameters())
    # the built-in base carries the pre-trained weights (task A), the same in both
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in lora.state_dict().items()
            if ".lora_" not in k and "modules_to_save" not in k}
    assert all(torch.equal(base[k], v) for k, v in full.state_dict().items() if k in base)


@pytest.mark.parametrize("overrides, key", [
    ({"dataset": "digits"}, "hf-classifier"),
    ({"dataset": "text", "base-model": "x", "dataset-path": "y"}, "num-classes"),
    ({"dataset": "text", "dataset-path": "y", "num-classes": 2}, "base-model"),
    ({"dataset": "text", "base-model": "x", "num-classes": 2}, "dataset-path"),
    ({"lora-targets": "query;value"}, "lora-targets"),
    ({"model": "mlp", "dataset": "text", "base-model": "x", "dataset-path": "y", "num-classes": 2}, "text"),
])
def test_bad_combinations_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        RunConfig.from_mapping({**BASE, **overrides})


def test_unknown_lora_target_names_the_key():
    from fl_subnet.experiments.experiment import factory_for

    with pytest.raises(ValueError, match="lora-targets 'nothing'"):
        factory_for(RunConfig.from_mapping({**BASE, "lora-targets": "nothing"}))()


def _words(label: int, gen: torch.Generator, words_per_class: int = 3, n: int = 6) -> str:
    """A "review" of ``n`` words: each a sentiment word of ``label`` (the first
    ``words_per_class`` of each list) with probability 1/2, else a neutral one."""
    good, bad = ["good", "great", "fine"][:words_per_class], ["bad", "awful", "poor"][:words_per_class]
    neutral = ["the", "a", "movie", "was", "it"]
    out = []
    for _ in range(n):
        pool = (good if label else bad) if torch.rand((), generator=gen) < 0.5 else neutral
        out.append(pool[int(torch.randint(len(pool), (), generator=gen))])
    return " ".join(out)


@pytest.fixture(scope="module")
def local_model_and_data(tmp_path_factory):
    """A user's pre-trained model folder (a tiny BERT with its tokenizer, ``save_pretrained``)
    and a text data set folder (``DatasetDict.save_to_disk``), both made here: offline."""
    import datasets
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("hf")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "fine", "bad", "awful", "poor",
             "the", "a", "movie", "was", "it"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2))
    # "pre-trained": the whole model, centrally, on reviews whose only sentiment words are
    # good / bad; the federated task adds great, fine, awful and poor
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(512) % 2
    x = torch.tensor(tokenizer([_words(int(y), gen, words_per_class=1) for y in labels], padding="max_length",
                               max_length=10)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        i = torch.randint(0, len(x), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x[i], attention_mask=(x[i] != 0).long()).logits,
                                                 labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)

    def split(n):
        labels = [i % 2 for i in range(n)]
        return datasets.Dataset.from_dict({"text": [_words(y, gen) for y in labels], "label": labels})

    datasets.DatasetDict(train=split(400), test=split(200)).save_to_disk(str(root / "data"))
    return root / "model", root / "data"


def test_text_dataset_from_a_local_folder_is_tokenized(local_model_and_data):
    from fl_subnet.experiments.data import load_text

    model_dir, data_dir = local_model_and_data
    data = load_text(path=str(data_dir), tokenizer=str(model_dir), seq_len=10)
    x = torch.tensor(data["train"]["x"])
    assert x.shape == (400, 10)
    assert bool((x[:, 0] == 2).all())          # [CLS] first
    assert bool((x[:, -1] == 0).all())         # 6 words + [CLS] + [SEP] padded to 10 with [PAD]
    assert data["train"]["label"][:4] == [0, 1, 0, 1]



def test_text_folder_without_a_test_split_names_dataset_path(local_model_and_data, tmp_path):
    import datasets

    from fl_subnet.experiments.data import load_text

    model_dir, _ = local_model_and_data
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["good"], "label": [1]})).save_to_disk(
        str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"dataset-path .* has no split\(s\) \['test'\]"):
        load_text(path=str(tmp_path / "d"), tokenizer=str(model_dir), seq_len=10)


def test_user_model_and_text_folder_fine_tune_with_rank_tiers(local_model_and_data, tmp_path):
    """A user's model folder and text folder through the run config: HeteroFL's rank tiers
    over LoRA adapters (Flower serde both ways, in-process grid) accepts every reply, learns
    the task, and reports each tier alone."""
    import tomli_w

    model_dir, data_dir = local_model_and_data
    scenario = tmp_path / "text.toml"
    scenario.write_text(tomli_w.dumps({
        "strategy": "heterofl", "model": "hf-classifier", "dataset": "text", "dataset-path": str(data_dir),
        "base-model": str(model_dir), "num-classes": 2, "input-dim": 10, "lora-rank": 4, "lora-alpha": 8.0,
        "capacity-tiers": "0.5,1.0", "num-nodes": 2, "partitioning": "iid", "num-server-rounds": 3,
        "local-steps": 10, "lr": 0.1, "momentum": 0.9, "batch-size": 32, "aggregation": "mean", "seed": 0}))
    out = tmp_path / "out"
    assert cli.main(["run", str(scenario), "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert all(r["num-replies"] == 2 and r["num-rejected"] == 0 for r in rows[1:]), rows
    # the base knows "good" / "bad" only; the adapters learn the other words (the loss on the
    # test set falls by a third in 3 rounds; a row with "awful" or "poor" but no "bad" takes longer
    # to flip, so the accuracy is not asserted)
    losses = [r["eval-loss"] for r in rows]
    assert losses[-1] < 0.8 * losses[0] and rows[-1]["full-train-loss"] < 0.8 * rows[0]["full-train-loss"], rows
    assert "tier-0.5-acc" in rows[-1] and rows[-1]["tier-1-acc"] == rows[-1]["eval-acc"]


def test_full_fine_tuning_through_the_run_config_sends_every_weight(tmp_path):
    """``lora-rank = 0``: no adapters, every weight of the pre-trained base trained and sent
    (FedAvg through strategy.start with Flower's serde): replies accepted, the loss falls,
    and a reply carries the whole model."""
    import tomli_w

    from fl_subnet.experiments.experiment import factory_for

    cfg = {**BASE, "strategy": "fedavg", "lora-rank": 0, "num-server-rounds": 2, "local-steps": 10, "lr": 0.01,
           "momentum": 0.9, "aggregation": "mean", "partitioning": "iid"}
    scenario = tmp_path / "full.toml"
    scenario.write_text(tomli_w.dumps(cfg))
    out = tmp_path / "out"
    assert cli.main(["run", str(scenario), "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert all(r["num-replies"] == 3 and r["num-rejected"] == 0 for r in rows[1:]), rows
    assert rows[-1]["full-train-loss"] < rows[0]["full-train-loss"], rows
    weights = sum(v.numel() * 4 for v in factory_for(RunConfig.from_mapping(cfg))().state_dict().values())
    # every weight, plus the records' per-tensor names and headers (41 small tensors: about 7%)
    assert all(3 * weights <= r["bytes-up"] <= 3 * weights * 1.1 for r in rows[1:]), (rows, weights)
