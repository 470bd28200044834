"""Training from Hugging Face datasets: packing, pre-tokenised ids, resumable positions, and the CLI
(``sae-hooks train --dataset <parquet on the local Hub server> --model <Hub id on the local server>``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from sae_hooks.errors import ConfigError  # noqa: E402
from sae_hooks.train.datasets import TokenBatches, load_dataset_any  # noqa: E402
from sae_hooks.train.sources import pack_texts  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from sae_hooks.app.default_model import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def texts():
    from sae_hooks.app.demo import pydoc_texts

    return pydoc_texts()[1][:40]


def test_text_column_packs_like_pack_texts(tok, texts):
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    got = list(TokenBatches(ds, tok, 32, 4))
    want = pack_texts(tok, texts, 32, 4, tok.bos_token_id, drop_last=False)
    assert len(got) == len(want) > 3
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all((b[:, 0] == tok.bos_token_id).all() for b in got)  # every row starts with BOS


def test_pretokenized_input_ids_are_used_as_they_are(tok):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 4000, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (30,), generator=g)]
    ds = datasets.Dataset.from_dict({"input_ids": docs})
    rows = torch.cat(list(TokenBatches(ds, None, 16, 3)))
    stream = [t for d in docs for t in d]
    n = len(stream) // 16
    assert torch.equal(rows, torch.tensor(stream[: n * 16]).view(n, 16))  # nothing added, nothing reordered


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_resuming_from_a_position_continues_exactly(tok, texts, streaming, shuffle):
    ds = datasets.Dataset.from_dict({"text": texts})
    if streaming:
        ds = ds.to_iterable_dataset(num_shards=4)

    def make():
        return TokenBatches(ds, tok, 24, 3, shuffle=shuffle, seed=5, epochs=2)

    full = list(make())
    first = make()
    head = [first.next_batch() for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert (state["example"], state["offset"]) > (0, 0) and set(state) == {"epoch", "example", "offset"}
    resumed = make()
    resumed.load_state_dict(state)
    got = head + list(resumed)
    assert len(got) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(got, full))
    if shuffle:  # a shuffled order differs from the file order, and epochs differ from each other
        plain = list(TokenBatches(ds, tok, 24, 3, epochs=2))
        assert not all(torch.equal(a, b) for a, b in zip(full, plain))


def test_local_files_and_save_to_disk(tmp_path, texts):
    ds = datasets.Dataset.from_dict({"text": texts})
    ds.to_parquet(str(tmp_path / "a.parquet"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_any(tmp_path / "a.parquet")["text"] == texts
    assert load_dataset_any(tmp_path / "saved", split="validation")["text"] == texts[:3]
    assert next(iter(load_dataset_any(tmp_path / "a.parquet", streaming=True)))["text"] == texts[0]
    with pytest.raises(ConfigError, match="no split 'test'"):
        load_dataset_any(tmp_path / "saved", split="test")
    with pytest.raises(ConfigError, match=r"no column 'body'.*\['text'\]"):
        TokenBatches(ds, None, 16, 2, column="body")


# The CLI against the local Hub server -------------------------------------------------------------


def _model_files() -> dict[str, bytes]:
    from sae_hooks.app.default_model import default_model_path

    folder = default_model_path()
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "training_report.json"}


@pytest.fixture
def served(hub_server, monkeypatch, tmp_path, texts):
    import datasets.config as dcfg

    monkeypatch.setattr(dcfg, "HF_ENDPOINT", hub_server.url, raising=False)
    monkeypatch.setattr(dcfg, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(dcfg, "HF_DATASETS_CACHE", tmp_path / "ds-cache", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    buf = io.BytesIO()
    datasets.Dataset.from_dict({"text": texts}).to_parquet(buf)
    hub_server.create_repo("team/pydoc-corpus", {"data/train-00000-of-00001.parquet": buf.getvalue()}, repo_type="dataset")
    hub_server.create_repo("team/tiny-stdlib-lm", _model_files())
    return hub_server


def _train(tmp_path, name, *extra):
    from sae_hooks.app.cli import main

    args = ["train", "--dataset", "team/pydoc-corpus", "--model", "team/tiny-stdlib-lm", "--site", "transformer.h.1",
            "--d-sae", "64", "--k", "4", "--batch-tokens", "256", "--buffer-tokens", "1024", "--seq-len", "32",
            "--batch-size", "4", "--no-progress", "--out", str(tmp_path / name), *extra]
    assert main(args) == 0
    from sae_hooks import load_native

    (folder,) = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
    return load_native(folder)


def test_cli_trains_from_a_hub_dataset_and_a_hub_model_and_resumes(served, tmp_path):
    straight = _train(tmp_path, "straight", "--steps", "8")
    _train(tmp_path, "first", "--steps", "4", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "4")
    meta = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    position = meta["buffer"]["source"]["dataset"]  # the checkpoint records the dataset position
    assert meta["step"] == 4 and (position["example"], position["offset"]) > (0, 0)
    resumed = _train(tmp_path, "resumed", "--steps", "8", "--resume", str(tmp_path / "ckpt"))
    cfg = resumed.cfg.metadata["training"]
    assert cfg["steps"] == 8 and cfg["tokens_seen"] == straight.cfg.metadata["training"]["tokens_seen"] == 8 * 256
    assert not torch.equal(resumed.W_dec, straight.W_dec * 0)
    # Both came through huggingface_hub's cache: offline, the cached snapshot is used without a request.
    from conftest_hub import set_hf_offline

    from sae_hooks.app.models import resolve_model

    served.clear_requests()
    mp = pytest.MonkeyPatch()
    try:
        set_hf_offline(mp, True)
        assert (resolve_model("team/tiny-stdlib-lm") / "model.safetensors").is_file()
        assert served.requests == []
    finally:
        mp.undo()


def test_resumed_dataset_training_equals_the_uninterrupted_run(tok, texts, tmp_path):
    """In process, with one learning-rate schedule for both runs: resuming from the dataset position
    (not by replaying forward passes) reproduces the uninterrupted run exactly."""
    from sae_hooks.app.demo import load_default_model
    from sae_hooks.saes.registry import make_sae
    from sae_hooks.train import ShuffleBuffer, Trainer, TrainEntry, TrainSettings, load_checkpoint, save_checkpoint
    from sae_hooks.train.datasets import DatasetSource

    model, _ = load_default_model()
    ds = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=2)

    def setup():
        torch.manual_seed(0)
        batches = TokenBatches(ds, tok, 32, 4, shuffle=True, seed=1)
        source = DatasetSource(model, ["transformer.h.1"], batches, bos_token_id=tok.bos_token_id)
        buffer = ShuffleBuffer(source, batch_tokens=128, size_tokens=512, seed=0)
        sae = make_sae("topk", 128, 64, k=4)
        settings = TrainSettings(lr=3e-3, warmup_steps=2, seed=0, total_steps=12)
        return Trainer([TrainEntry("e", "transformer.h.1", sae, settings)]), buffer, source

    full, buf, _ = setup()
    full.fit(buf, max_steps=12, progress=False)
    first, buf1, src1 = setup()
    first.fit(buf1, max_steps=5, progress=False)
    save_checkpoint(first, tmp_path / "ck", buf1)
    resumed, buf2, src2 = setup()
    load_checkpoint(resumed, tmp_path / "ck", buf2)
    assert src2.batches.state_dict() == src1.batches.state_dict() != {"epoch": 0, "example": 0, "offset": 0}
    resumed.fit(buf2, max_steps=12, progress=False)
    a, b = full.entries[0].sae, resumed.entries[0].sae
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_hub_model_without_safetensors_is_refused(hub_server):
    from sae_hooks.app.models import resolve_model
    from sae_hooks.errors import SAEHooksError

    hub_server.create_repo("team/pickled", {"config.json": b"{}", "pytorch_model.bin": b"not loaded"})
    with pytest.raises(SAEHooksError, match="no safetensors weights"):
        resolve_model("team/pickled")
