"""Run a model over token batches once and feed every latent of an SAE into :class:`FeatureCollector`s.

Activations are read with :class:`sae_hooks.train.sources.ActivationReader` (one forward pass per
batch, all sites at once, the forward stopped after the deepest site) through the site layer
(:func:`sae_hooks.sites.site_hooks`): a model given the SAE API by an adapter is read through that
adapter's backend, a TransformerLens model through its ``hook_dict``, a plain ``nn.Module`` (or the
module under an nnsight envoy) through forward hooks; sites in any spelling (hook name, module path,
``path:input``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError, SAEHooksError
from ...saes.base import SAE, SparseLatents
from ...sites import site_hooks
from ...train.sources import ActivationReader, _split_batch, token_mask
from .collect import CollectorSettings, FeatureCollector, FeatureStats


def forward_module(model: Any) -> Any:
    """What to call for a forward pass: the module under an nnsight envoy, else the model itself."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, torch.nn.Module) and not isinstance(model, torch.nn.Module) else model


def resolve_reader(model: Any, sites: list[str], bos_token_id: int | None) -> ActivationReader:
    """An :class:`ActivationReader` for ``sites`` of ``model`` (through its adapter when it has one)."""
    attached = "sae_manager" in getattr(model, "__dict__", {})
    hooks = site_hooks(model if attached or hasattr(model, "hook_dict") else forward_module(model), sites)
    return ActivationReader(forward_module(model), sites, hooks=hooks, bos_token_id=bos_token_id)


def default_sites(sae: SAE, site: str | list[str] | None, model: Any = None) -> list[str]:
    """``site`` as a list, else the SAE's ``cfg.sites``: hook names for a TransformerLens model or one
    given the SAE API by an adapter, module paths (when recorded) for a plain module."""
    if site is not None:
        return [site] if isinstance(site, str) else list(site)
    by_name = model is None or hasattr(model, "hook_dict") or "sae_manager" in getattr(model, "__dict__", {})
    sites = [(s.hook or s.module) if by_name else (s.module or s.hook) for s in sae.cfg.sites]
    if not sites or any(s is None for s in sites):
        raise ConfigError("the SAE records no site it was trained on; pass site=<hook name or module path>")
    return sites  # type: ignore[return-value]


def sparse_of(latents: Tensor | SparseLatents, d_sae: int) -> SparseLatents:
    """Dense latents as :class:`SparseLatents` with ``k`` = the largest number of firing latents on a row."""
    if isinstance(latents, SparseLatents):
        return latents
    k = max(1, int((latents > 0).sum(-1).max())) if latents.numel() else 1
    values, indices = latents.topk(min(k, d_sae), dim=-1)
    return SparseLatents(values, indices, d_sae)


def encode_chunks(encode: Callable[[Tensor], Any], x: Tensor, d_sae: int, budget: int = 2**26) -> list[Any]:
    """``encode`` over row chunks of ``x`` so that no ``(rows, d_sae)`` intermediate exceeds ``budget`` elements."""
    step = max(1, budget // max(1, d_sae))
    return [encode(x[i : i + step]) for i in range(0, x.shape[0], step)]


def cat_sparse(parts: list[SparseLatents], d_sae: int) -> SparseLatents:
    k = max(p.values.shape[-1] for p in parts)

    def pad(t: Tensor, fill: float) -> Tensor:
        return torch.cat([t, t.new_full((t.shape[0], k - t.shape[1]), fill)], 1) if t.shape[1] < k else t

    return SparseLatents(
        torch.cat([pad(p.values.float(), 0.0) for p in parts]), torch.cat([pad(p.indices, 0) for p in parts]), d_sae
    )


@dataclass
class StreamResult:
    stats: dict[str, FeatureStats]  # one per dictionary: "sae", or "input"/"output" for a Jacobian pair
    jacobian: Any = None  # JacobianAccumulator for a pair
    n_tokens: int = 0


def iter_batches(batches: Iterable[Any], max_tokens: int | None) -> Iterator[tuple[Tensor, Tensor | None]]:
    seen = 0
    for batch in batches:
        ids, mask = _split_batch(batch)
        if max_tokens is not None:
            if seen >= max_tokens:
                return
            rows = -(-(max_tokens - seen) // ids.shape[1])
            ids, mask = ids[:rows], (mask[:rows] if mask is not None else None)
        seen += ids.numel()
        yield ids, mask


@torch.no_grad()
def stream(
    sae: Any,
    model: Any,
    batches: Iterable[Any],
    *,
    site: str | list[str] | None = None,
    bos_token_id: int | None = None,
    settings: CollectorSettings | None = None,
    max_tokens: int | None = None,
    total_tokens: int | None = None,
    progress: bool = True,
) -> StreamResult:
    """Run ``model`` over ``batches`` once, encode with ``sae`` and collect statistics for every latent.

    ``sae`` is an :class:`~sae_hooks.SAE` (a multi-layer SAE reads all its sites in one forward pass
    and records the layer of every example) or a :class:`~sae_hooks.saes.jacobian.JacobianSAEPair`
    (read at its input site; the output SAE encodes the pair's MLP output, as in training).
    """
    from ...saes.jacobian import JacobianSAEPair

    pair = isinstance(sae, JacobianSAEPair)
    if pair:
        sites = [site] if isinstance(site, str) else list(site) if site else [sae.cfg.hook_in]
        saes = {"input": sae.sae_in, "output": sae.sae_out}
        acc: Any = JacobianAccumulator(sae.sae_in.cfg.d_sae, sae.sae_out.cfg.d_sae)
    else:
        if not isinstance(sae, SAE):
            raise TypeError(f"dashboard expects an SAE or a JacobianSAEPair, got {type(sae).__name__}")
        sites = default_sites(sae, site, model)
        if sae.cfg.is_transcoder:
            sites = sites[:1]  # a transcoder's latents come from its input site
        saes = {"sae": sae}
        acc = None
    n_layers = len(sites) if not pair else 1
    collectors = {name: FeatureCollector(s.cfg.d_sae, settings, n_layers=n_layers) for name, s in saes.items()}
    reader = resolve_reader(model, sites, bos_token_id)
    device = next(iter(saes.values())).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = min(t for t in (total_tokens, max_tokens) if t is not None) if (total_tokens or max_tokens) else None
        bar = tqdm(total=total, desc="dashboard", unit="tok", unit_scale=True)
    n_tokens = 0
    try:
        for ids, mask in iter_batches(batches, max_tokens):
            keep = token_mask(ids, mask, bos_token_id)
            if mask is None and not hasattr(model, "hook_dict"):
                mask = torch.ones_like(ids)  # Hugging Face models warn without one (BOS may equal PAD)
            acts = reader.read(ids, mask)
            if pair:
                x = acts[sites[0]].to(device)
                step = max(1, 2**26 // max(sae.sae_in.cfg.d_sae, sae.sae_out.cfg.d_sae))
                outs = [sae.encode_pair(x[i : i + step]) for i in range(0, x.shape[0], step)]
                lat_in = cat_sparse([o["lat_in"] for o in outs], sae.sae_in.cfg.d_sae)
                lat_out = cat_sparse([o["lat_out"] for o in outs], sae.sae_out.cfg.d_sae)
                collectors["input"].update(ids, keep, lat_in)
                collectors["output"].update(ids, keep, lat_out)
                for o in outs:
                    acc.update(o["jacobian"], o["lat_in"], o["lat_out"])
            else:
                (s,) = saes.values()
                for layer, name in enumerate(sites):
                    x = acts[name].to(device)
                    parts = encode_chunks(lambda c: sparse_of(s.encode_with_state(c)[0], s.cfg.d_sae), x, s.cfg.d_sae)
                    collectors["sae"].update(ids, keep, cat_sparse(parts, s.cfg.d_sae), layer=layer)
            n = int(keep.sum())
            n_tokens += n
            if bar is not None:
                bar.update(ids.numel())
    finally:
        if bar is not None:
            bar.close()
    if n_tokens == 0:
        raise SAEHooksError("the dashboard saw no tokens (empty data, or every token was BOS/padding)")
    return StreamResult({k: c.finish() for k, c in collectors.items()}, acc, n_tokens)


class JacobianAccumulator:
    """Sums of the sparse Jacobian ``d out_j / d in_i`` over tokens where both latents fire.

    Kept as a sparse map from ``(out, in)`` pairs to (sum, sum of ``|J|``, count); memory grows with the
    number of distinct co-active pairs (at most ``d_in * d_out``), merged once per batch.
    """

    def __init__(self, d_in: int, d_out: int):
        self.d_in, self.d_out = d_in, d_out
        self.keys = torch.zeros(0, dtype=torch.long)
        self.sum = torch.zeros(0, dtype=torch.float64)
        self.abs_sum = torch.zeros(0, dtype=torch.float64)
        self.count = torch.zeros(0, dtype=torch.long)

    def update(self, J: Tensor, lat_in: SparseLatents, lat_out: SparseLatents) -> None:
        """``J (n, k_out, k_in)`` on the active sets ``lat_in.indices (n, k_in)``, ``lat_out.indices (n, k_out)``."""
        J = J.detach().float().cpu()
        ii = lat_in.indices.cpu().unsqueeze(-2).expand_as(J)
        oo = lat_out.indices.cpu().unsqueeze(-1).expand_as(J)
        live = (lat_in.values.cpu() > 0).unsqueeze(-2) & (lat_out.values.cpu() > 0).unsqueeze(-1)
        keys = (oo[live] * self.d_in + ii[live]).long()
        vals = J[live].double()
        allk = torch.cat([self.keys, keys])
        uniq, inv = torch.unique(allk, return_inverse=True)
        new_sum = torch.zeros(len(uniq), dtype=torch.float64)
        new_abs = torch.zeros(len(uniq), dtype=torch.float64)
        new_cnt = torch.zeros(len(uniq), dtype=torch.long)
        new_sum.index_add_(0, inv, torch.cat([self.sum, vals]))
        new_abs.index_add_(0, inv, torch.cat([self.abs_sum, vals.abs()]))
        new_cnt.index_add_(0, inv, torch.cat([self.count, torch.ones_like(keys)]))
        self.keys, self.sum, self.abs_sum, self.count = uniq, new_sum, new_abs, new_cnt

    def top(self, n: int) -> tuple[dict[int, list[tuple[int, float, int]]], dict[int, list[tuple[int, float, int]]]]:
        """Per input latent the ``n`` output latents with the largest total ``|J|``, and per output latent
        the ``n`` input latents; entries are ``(other latent, mean J when both fire, co-firing count)``."""
        order = torch.argsort(self.abs_sum, descending=True)
        by_in: dict[int, list] = {}
        by_out: dict[int, list] = {}
        for key, s, c in zip(self.keys[order].tolist(), self.sum[order].tolist(), self.count[order].tolist()):
            o, i = divmod(key, self.d_in)
            if len(by_in.setdefault(i, [])) < n:
                by_in[i].append((o, s / c, c))
            if len(by_out.setdefault(o, [])) < n:
                by_out[o].append((i, s / c, c))
        return by_in, by_out
