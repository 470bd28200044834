"""Live activation sources on real models, disk capture, splice evals on the embedded model, the CLI."""

from __future__ import annotations

import pytest
import torch

from sae_hooks import load_native, make_sae
from sae_hooks.eval import fvu, hooks_splice_runner, reconstruction_metrics, splice_metrics
from sae_hooks.train import (
    ActivationReader, DiskSource, LiveSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings, save_activations,
)

transformers = pytest.importorskip("transformers")


def tiny_gpt2(n_layer: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=n_layer, n_head=2,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def token_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (3, 10), generator=g)
    ids[:, 0] = 0  # BOS
    ids[1, 5] = 0  # a BOS/EOS token mid-sequence (document boundary) is dropped too
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def test_live_source_reads_sites_in_one_forward_and_stops_early() -> None:
    model = tiny_gpt2()
    calls = {i: 0 for i in range(4)}
    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = token_batch()
    source = LiveSource(model, ["transformer.h.0", "transformer.h.1"], [batch, batch], bos_token_id=0)
    chunk = source.next_chunk()
    assert calls == {0: 1, 1: 1, 2: 0, 3: 0}  # one forward; blocks 2 and 3 never ran
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    keep = (batch["attention_mask"] == 1) & (batch["input_ids"] != 0)
    assert int(keep.sum()) == 3 * 10 - 3 - 1 - 3
    torch.testing.assert_close(chunk["transformer.h.0"], hidden[1][keep])
    torch.testing.assert_close(chunk["transformer.h.1"], hidden[2][keep])
    # without stop_early every block runs
    for k in calls:
        calls[k] = 0
    ActivationReader(model, ["transformer.h.0"], bos_token_id=0, stop_early=False).read(batch["input_ids"])
    assert calls == {0: 1, 1: 1, 2: 1, 3: 1}
    assert source.state_dict() == {"position": 1}


@pytest.mark.parametrize("kind", ["bridge_native", "bridge_hf"])
def test_live_source_through_transformer_lens_hook_names(kind: str) -> None:
    from conftest import build_tl_model

    model = build_tl_model(kind)
    n_layers = model.cfg.n_layers
    last = model.hook_dict[f"blocks.{n_layers - 1}.hook_resid_post"]
    calls = []
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(1, 50, (2, 8))
    ids[:, 0] = 0
    sites = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
    chunk = ActivationReader(model, sites, bos_token_id=0).read(ids)
    assert calls == []  # stopped after block 0
    handle.remove()
    _, cache = model.run_with_cache(ids)
    for s in sites:
        d = cache[s].shape[-1]
        torch.testing.assert_close(chunk[s], cache[s][:, 1:].reshape(-1, d))
    assert not any(getattr(hp, "_forward_hooks", None) for hp in model.hook_dict.values())  # temporary hooks gone


def test_capture_to_disk_and_replay(tmp_path) -> None:
    model = tiny_gpt2(2)
    batches = [token_batch()["input_ids"] for _ in range(5)]
    out = save_activations(model, ["transformer.h.0", "transformer.h.1"], batches, tmp_path / "acts", shard_tokens=40, bos_token_id=0)
    reader = ActivationReader(model, ["transformer.h.0", "transformer.h.1"], bos_token_id=0)
    expected = {s: torch.cat([reader.read(b)[s] for b in batches]) for s in reader.sites}
    n = expected["transformer.h.0"].shape[0]
    src = DiskSource(out)
    got = []
    while (c := src.next_chunk()) is not None:
        got.append(c)
    for s in reader.sites:
        torch.testing.assert_close(torch.cat([c[s] for c in got]), expected[s])
    assert [c["transformer.h.0"].shape[0] for c in got][:-1] == [40] * (len(got) - 1)
    # shuffled replay: same rows (aligned across sites), different order; resumable by position
    shuf = DiskSource(out, shuffle=True, seed=1, chunk_tokens=16)
    chunks = [c["transformer.h.1"] for c in iter(shuf.next_chunk, None)]
    rows = torch.cat(chunks)
    assert rows.shape[0] == n and not torch.equal(rows, expected["transformer.h.1"])
    assert torch.equal(rows.sort(0).values, expected["transformer.h.1"].sort(0).values)
    again = DiskSource(out, shuffle=True, seed=1, chunk_tokens=16)
    again.load_state_dict({"position": 3})
    torch.testing.assert_close(torch.cat([c["transformer.h.1"] for c in iter(again.next_chunk, None)]), torch.cat(chunks[3:]))


def test_trained_sae_on_embedded_model_recovers_ce_loss() -> None:
    from sae_hooks.app.demo import load_default_model, pydoc_texts
    from sae_hooks.train.sources import pack_texts

    model, tok = load_default_model()
    train_texts, held = pydoc_texts()
    batches = pack_texts(tok, train_texts[:30], 64, 16, 0)
    eval_batches = pack_texts(tok, held, 64, 8, 0)[:2]
    site = "transformer.h.1"
    source = LiveSource(model, [site], lambda: (b for _ in range(10) for b in batches), bos_token_id=0)
    buffer = ShuffleBuffer(source, batch_tokens=512, size_tokens=4096)
    entry = TrainEntry("sae", site, make_sae("topk", 128, 512, k=16), TrainSettings(lr=4e-3, warmup_steps=10))
    Trainer([entry]).fit(buffer, max_steps=80)
    sae = entry.final_sae()
    reader = ActivationReader(model, [site], bos_token_id=0)
    acts = [reader.read(b)[site] for b in eval_batches]
    rec = reconstruction_metrics(sae, acts)
    torch.testing.assert_close(torch.tensor(rec["fvu"]), torch.tensor(fvu(torch.cat(acts), sae(torch.cat(acts)))), rtol=1e-4, atol=1e-6)
    down = splice_metrics(hooks_splice_runner(model, site, bos_token_id=0), sae, eval_batches)
    print(rec, down)
    assert rec["fvu"] < 0.5 and abs(rec["l0"] - 16) < 1e-6
    assert down["ce_sae"] < down["ce_zero"]
    assert down["ce_loss_score"] > 0.5
    # independent check of the clean CE: the model's own loss, predictions from BOS positions left out
    ids = eval_batches[0]
    labels = ids.clone()
    labels[:, 1:][ids[:, :-1] == 0] = -100
    with torch.no_grad():
        own = model(ids, labels=labels).loss.item()
    single = splice_metrics(hooks_splice_runner(model, site, bos_token_id=0), sae, [ids])
    assert abs(single["ce_clean"] - own) < 1e-4


def test_cli_capture_train_eval(tmp_path, capsys) -> None:
    from sae_hooks.app.cli import main

    acts = tmp_path / "acts"
    assert main(["capture", "--site", "transformer.h.0", "--out", str(acts), "--seq-len", "64", "--batch-size", "8",
                 "--max-batches", "4", "--no-progress"]) == 0
    assert main(["train", "--activations", str(acts), "--arch", "topk", "--k", "8", "--d-sae", "256", "--steps", "6",
                 "--batch-tokens", "256", "--buffer-tokens", "1024", "--seeds", "0", "1", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved == ["transformer.h.0-topk-s0", "transformer.h.0-topk-s1"]
    sae = load_native(tmp_path / "out" / saved[0])
    assert sae.cfg.metadata["training"]["tokens_seen"] == 6 * 256
    assert main(["eval", str(tmp_path / "out" / saved[0]), "--seq-len", "64", "--batch-size", "4", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "ce_loss_score" in out and "wrote" in out
