"""Every corruption of our own files (native SAE folders, training checkpoints, capture folders) is
refused with a typed error naming the file, before anything is half-restored or allocated; special
files (FIFO, folder, symlink loop) and memory bombs are refused at once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import activation_folder
import sae_hooks
from sae_hooks.errors import ConfigError, SAEFormatError, SAEHooksError, ShapeMismatchError
from sae_hooks.native import load
from sae_hooks.saes.registry import make_sae
from sae_hooks.train import DiskSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings, load_checkpoint
from sae_hooks.train.checkpoint import save_checkpoint
from sae_hooks.train.sources import IteratorSource


class _Hang(BaseException):
    pass


@pytest.fixture(autouse=True)
def _no_hang():
    """A refused file must be refused fast: a FIFO read or a memory bomb would trip this alarm."""
    def boom(*_: Any) -> None:
        raise _Hang("hang")  # not an OSError: no reader may swallow it

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def random_sae(arch: str = "topk", seed: int = 0, **kw: Any):
    torch.manual_seed(seed)
    sae = make_sae(arch, 6, 12, **({"k": 3} if arch == "topk" else {}), **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


# Native folders ----------------------------------------------------------------------------------

NATIVE_KEYS = list(random_sae().cfg.to_dict())


@pytest.mark.parametrize("key", NATIVE_KEYS)
def test_native_config_without_a_key_is_refused(tmp_path: Path, key: str) -> None:
    random_sae().save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg[key]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"cfg\.json: missing key\(s\) \['{key}'\]"):
        load(tmp_path / "s")
    with pytest.raises(ConfigError, match=key):  # through detection too
        sae_hooks.load(tmp_path / "s")


def _edit_cfg(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    (folder / "cfg.json").write_text(json.dumps(cfg))


_DROP = object()
NATIVE_CORRUPTIONS: dict[str, tuple[dict[str, Any], type, str]] = {
    "k_fractional": ({"k": 4.7}, ConfigError, "k"),
    "k_string": ({"k": "4"}, ConfigError, "k"),
    "d_sae_huge": ({"d_sae": 10**30}, ConfigError, "d_sae"),
    "d_sae_float": ({"d_sae": 12.0}, ConfigError, "d_sae"),
    "d_sae_disagrees_with_tensors": ({"d_sae": 13}, ShapeMismatchError, "W_enc"),
    "normalize_bool": ({"normalize": True}, ConfigError, "normalize"),
    "apply_b_dec_string": ({"apply_b_dec_to_input": "yes"}, ConfigError, "apply_b_dec_to_input"),
    "format_lost": ({"format": _DROP}, SAEFormatError, "format"),
    "format_version_newer": ({"format_version": 99}, SAEFormatError, "format_version"),
    "sites_not_list": ({"sites": "blocks.0"}, ConfigError, "sites"),
}


@pytest.mark.parametrize("case", sorted(NATIVE_CORRUPTIONS))
def test_native_config_corruptions(tmp_path: Path, case: str) -> None:
    changes, err, word = NATIVE_CORRUPTIONS[case]
    random_sae().save(tmp_path / "s")
    _edit_cfg(tmp_path / "s", **changes)
    for loader in (load, sae_hooks.load):
        with pytest.raises(err, match=word):
            loader(tmp_path / "s")


def _edit_tensors(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    ts = load_file(str(folder / "sae.safetensors"))
    fn(ts)
    save_file(ts, str(folder / "sae.safetensors"))


TENSOR_CORRUPTIONS: dict[str, tuple[Callable[[dict], None], str]] = {
    "nan": (lambda t: t["W_dec"].view(-1).__setitem__(5, float("nan")), "NaN"),
    "inf": (lambda t: t["b_enc"].__setitem__(0, float("inf")), "NaN/inf"),
    "int": (lambda t: t.__setitem__("W_enc", (t["W_enc"] * 10).to(torch.int32)), "floating point"),
    "bool": (lambda t: t.__setitem__("b_dec", t["b_dec"] > 0), "floating point"),
    "missing": (lambda t: t.pop("b_dec"), "missing"),
    "extra": (lambda t: t.__setitem__("junk", torch.zeros(2)), "unexpected"),
    "transposed": (lambda t: t.__setitem__("W_enc", t["W_enc"].T.contiguous()), "shape"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CORRUPTIONS))
def test_native_tensor_corruptions(tmp_path: Path, case: str) -> None:
    fn, word = TENSOR_CORRUPTIONS[case]
    random_sae().save(tmp_path / "s")
    _edit_tensors(tmp_path / "s", fn)
    with pytest.raises(ShapeMismatchError if case == "transposed" else SAEFormatError, match=word):
        load(tmp_path / "s")


def test_native_defaults_no_longer_fill_lost_keys_silently(tmp_path: Path) -> None:
    """The issue's case: a cfg.json that lost apply_b_dec_to_input/normalize/norm_scale gave outputs off by 3.0."""
    sae = random_sae("relu", apply_b_dec_to_input=True, normalize="scale", norm_scale=2.0)
    sae.save(tmp_path / "s")
    _edit_cfg(tmp_path / "s", apply_b_dec_to_input=_DROP, normalize=_DROP, norm_scale=_DROP)
    with pytest.raises(ConfigError, match="apply_b_dec_to_input"):
        load(tmp_path / "s")


def test_special_files_are_refused_fast(tmp_path: Path) -> None:
    random_sae().save(tmp_path / "s")
    cfg = tmp_path / "s" / "cfg.json"
    cfg.unlink()
    os.mkfifo(cfg)  # reading it would block forever
    t0 = time.monotonic()
    with pytest.raises(SAEFormatError, match="FIFO"):
        load(tmp_path / "s")
    with pytest.raises(SAEHooksError):
        sae_hooks.load(tmp_path / "s")
    assert time.monotonic() - t0 < 30
    cfg.unlink()
    cfg.mkdir()
    with pytest.raises(SAEFormatError, match="folder"):
        load(tmp_path / "s")
    cfg.rmdir()
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    os.symlink(tmp_path / "loop_a", cfg)
    with pytest.raises(SAEFormatError, match="cannot be opened"):
        load(tmp_path / "s")
    cfg.unlink()
    cfg.write_text("[" * 100_000 + "]" * 100_000)  # deeply nested JSON
    with pytest.raises(SAEFormatError, match="nested|JSON"):
        load(tmp_path / "s")
    with open(cfg, "wb") as f:  # a sparse 1 GB "config": refused from its size, never read
        f.truncate(2**30)
    with pytest.raises(SAEFormatError, match="too large"):
        load(tmp_path / "s")


def test_mlsae_layer_count_bomb_is_refused_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "mlsae-pythia-70m-deduped-x3-k4"
    folder.mkdir()
    save_file({"encoder.weight": torch.randn(12, 6), "decoder.weight": torch.randn(6, 12),
               "pre_encoder_bias": torch.randn(6)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"n_inputs": 6, "n_latents": 12, "k": 3, "n_layers": 10**9}))
    t0 = time.monotonic()
    with pytest.raises(SAEFormatError, match="n_layers"):
        sae_hooks.load(folder)
    assert time.monotonic() - t0 < 10  # was 39 s and 2.5 GB before a MemoryError


# Checkpoints -------------------------------------------------------------------------------------


def _trainer() -> Trainer:
    entries = [TrainEntry(f"e{i}", "x", make_sae(a, 6, 12, **({"k": 3} if a == "topk" else {})),
                          TrainSettings(seed=i, total_steps=5)) for i, a in enumerate(["topk", "relu"])]
    return Trainer(entries)


def _buffer(seed: int = 0) -> ShuffleBuffer:
    data = [torch.randn(64, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    return ShuffleBuffer(IteratorSource(data), batch_tokens=32, size_tokens=128, seed=seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "c"
    tr, buf = _trainer(), _buffer()
    torch.manual_seed(0)
    tr.fit(buf, max_steps=3)
    save_checkpoint(tr, path, buf)
    return path


def _json_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        meta = json.loads((path / "trainer.json").read_text())
        fn(meta)
        (path / "trainer.json").write_text(json.dumps(meta))
    return apply


def _tensor_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        ts = load_file(str(path / "tensors.safetensors"))
        fn(ts)
        save_file(ts, str(path / "tensors.safetensors"))
    return apply


def _set(d: dict, *keys: str, value: Any = None, drop: bool = False) -> None:
    for k in keys[:-1]:
        d = d[k]
    if drop:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


CKPT_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    **{f"drop_{k}": _json_edit(lambda m, k=k: _set(m, k, drop=True))
       for k in ("version", "step", "tokens_seen", "entries", "python_random", "buffer")},
    **{f"drop_entry_{k}": _json_edit(lambda m, k=k: _set(m, "entries", "e0", k, drop=True))
       for k in ("sites", "kind", "settings", "state", "objective", "optimizer")},
    "step_string": _json_edit(lambda m: _set(m, "step", value="3")),
    "step_negative": _json_edit(lambda m: _set(m, "step", value=-1)),
    "entries_list": _json_edit(lambda m: _set(m, "entries", value=[])),
    "python_random_int": _json_edit(lambda m: _set(m, "python_random", value=5)),
    "kind_other": _json_edit(lambda m: _set(m, "entries", "e0", "kind", value="mlsae")),
    "sites_other": _json_edit(lambda m: _set(m, "entries", "e1", "sites", value=["y"])),
    "sites_string": _json_edit(lambda m: _set(m, "entries", "e1", "sites", value="x")),
    "optimizer_index_out_of_range": _json_edit(lambda m: _set(m, "entries", "e0", "optimizer", "indices", value=[0, 99])),
    "optimizer_groups_dict": _json_edit(lambda m: _set(m, "entries", "e0", "optimizer", "param_groups", value={})),
    "state_unknown_field": _json_edit(lambda m: _set(m, "entries", "e0", "state", "bogus", value=1)),
    "settings_unknown_field": _json_edit(lambda m: _set(m, "entries", "e0", "settings", "bogus", value=1)),
    "json_truncated": lambda p: (p / "trainer.json").write_text((p / "trainer.json").read_text()[:50]),
    "json_list": lambda p: (p / "trainer.json").write_text("[]"),
    "tensors_missing": lambda p: (p / "tensors.safetensors").unlink(),
    "tensors_truncated": lambda p: (p / "tensors.safetensors").write_bytes((p / "tensors.safetensors").read_bytes()[:300]),
    **{f"drop_tensor_{k}": _tensor_edit(lambda t, k=k: t.pop(k))
       for k in ("entry.e0.model.W_enc", "entry.e1.model.b_dec", "entry.e0.dead", "rng.torch",
                 "entry.e0.opt.0.exp_avg", "buffer.generator")},
    "W_enc_transposed": _tensor_edit(lambda t: t.__setitem__("entry.e0.model.W_enc", t["entry.e0.model.W_enc"].T.contiguous())),
    "W_dec_wrong_size": _tensor_edit(lambda t: t.__setitem__("entry.e1.model.W_dec", torch.zeros(11, 6))),
    "dead_wrong_length": _tensor_edit(lambda t: t.__setitem__("entry.e1.dead", torch.zeros(3))),
    "exp_avg_wrong_shape": _tensor_edit(lambda t: t.__setitem__("entry.e0.opt.0.exp_avg", torch.zeros(2, 2))),
    "W_dec_nan": _tensor_edit(lambda t: t["entry.e0.model.W_dec"].view(-1).__setitem__(0, float("nan"))),
    "W_enc_int": _tensor_edit(lambda t: t.__setitem__("entry.e0.model.W_enc", t["entry.e0.model.W_enc"].to(torch.int64))),
    "rng_float": _tensor_edit(lambda t: t.__setitem__("rng.torch", t["rng.torch"].float())),
    "extra_model_tensor": _tensor_edit(lambda t: t.__setitem__("entry.e0.model.junk", torch.zeros(3))),
}


@pytest.mark.parametrize("case", sorted(CKPT_CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_with_a_typed_error(checkpoint: Path, tmp_path: Path, case: str) -> None:
    import shutil

    path = tmp_path / "c"
    shutil.copytree(checkpoint, path)
    CKPT_CORRUPTIONS[case](path)
    tr = _trainer()
    before = {k: v.clone() for k, v in tr.entries[0].sae.state_dict().items()}
    with pytest.raises(SAEHooksError):
        load_checkpoint(tr, path, _buffer())
    if case.startswith(("drop_entry", "W_", "dead", "exp_avg", "optimizer", "drop_tensor_entry", "extra", "kind", "sites")):
        after = tr.entries[0].sae.state_dict()  # refused before anything was restored
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_intact_checkpoint_still_resumes_exactly(checkpoint: Path) -> None:
    """The checks refuse corruption, not valid checkpoints: resuming gives the uninterrupted run's weights."""
    full, buf = _trainer(), _buffer()
    torch.manual_seed(0)
    full.fit(buf, max_steps=5)
    tr, buf2 = _trainer(), _buffer()
    load_checkpoint(tr, checkpoint, buf2)
    tr.fit(buf2, max_steps=5)
    for a, b in zip(full.entries, tr.entries):
        for k, v in a.sae.state_dict().items():
            assert torch.equal(v, b.sae.state_dict()[k]), k


def test_resume_with_another_batch_size_is_refused(checkpoint: Path) -> None:
    buf = ShuffleBuffer(IteratorSource([torch.randn(64, 6)]), batch_tokens=16, size_tokens=128)
    with pytest.raises(ConfigError, match="batch_tokens=32"):
        load_checkpoint(_trainer(), checkpoint, buf)


# Capture folders ---------------------------------------------------------------------------------


def _capture(folder: Path, tokens: tuple[int, ...] = (40, 24)) -> Path:
    return activation_folder(folder, {"a": 6, "b": 4}, tokens)


def _manifest_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        m = json.loads((path / "manifest.json").read_text())
        fn(m)
        (path / "manifest.json").write_text(json.dumps(m))
    return apply


def _shard_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        ts = load_file(str(path / "shard_00001.safetensors"))
        fn(ts)
        save_file(ts, str(path / "shard_00001.safetensors"))
    return apply


CAPTURE_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "manifest_missing": lambda p: (p / "manifest.json").unlink(),
    "manifest_not_json": lambda p: (p / "manifest.json").write_text("{"),
    "sites_missing": _manifest_edit(lambda m: m.pop("sites")),
    "sites_not_strings": _manifest_edit(lambda m: m.__setitem__("sites", [1, 2])),
    "width_missing": _manifest_edit(lambda m: m["widths"].pop("b")),
    "width_zero": _manifest_edit(lambda m: m["widths"].__setitem__("a", 0)),
    "tokens_impossible": _manifest_edit(lambda m: m.__setitem__("tokens", 10**12)),
    "shard_tokens_negative": _manifest_edit(lambda m: m["shards"][0].__setitem__("tokens", -5)),
    "shard_path_escapes": _manifest_edit(lambda m: m["shards"][0].__setitem__("file", "../x.safetensors")),
    "shard_repeated": _manifest_edit(lambda m: m["shards"].__setitem__(1, dict(m["shards"][0]))),
    "dtype_unknown": _manifest_edit(lambda m: m.__setitem__("dtype", "int8")),
    "shard_file_missing": lambda p: (p / "shard_00001.safetensors").unlink(),
    "shard_short": _shard_edit(lambda t: t.update({k: v[:-3].contiguous() for k, v in t.items()})),
    "shard_wrong_width": _shard_edit(lambda t: t.__setitem__("a", torch.zeros(24, 7))),
    "shard_site_missing": _shard_edit(lambda t: t.pop("b")),
    "shard_int": _shard_edit(lambda t: t.__setitem__("b", torch.zeros(24, 4, dtype=torch.int32))),
    "shard_truncated": lambda p: (p / "shard_00001.safetensors").write_bytes((p / "shard_00001.safetensors").read_bytes()[:100]),
    "shard_is_fifo": lambda p: ((p / "shard_00001.safetensors").unlink(), os.mkfifo(p / "shard_00001.safetensors")),
}


@pytest.mark.parametrize("case", sorted(CAPTURE_CORRUPTIONS))
def test_corrupt_capture_folder_is_refused_when_opened(tmp_path: Path, case: str) -> None:
    folder = _capture(tmp_path / "acts")
    CAPTURE_CORRUPTIONS[case](folder)
    with pytest.raises(SAEFormatError):
        DiskSource(folder)


def test_intact_capture_folder_replays_every_row(tmp_path: Path) -> None:
    folder = _capture(tmp_path / "acts")
    src = DiskSource(folder)
    rows = []
    while (chunk := src.next_chunk()) is not None:
        rows.append(chunk["a"])
    want = torch.cat([load_file(str(folder / f"shard_{i:05d}.safetensors"))["a"] for i in range(2)])
    assert torch.equal(torch.cat(rows), want)
