"""``sae-hooks mdl SAE``: description length (bits/token) of an SAE's latents vs the dense activations."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._analysis import add_model_args, load_sae, model_batches, sae_site


def cmd_mdl(args: argparse.Namespace) -> int:
    from ...eval.mdl import mdl_report
    from ...eval.splice import hooks_splice_runner
    from ...train.sources import ActivationReader

    sae = load_sae(args.sae)
    model, _, batches, bos = model_batches(args)
    site = sae_site(model, sae, args.site, "mdl")
    acts = [ActivationReader(model, [site], bos_token_id=bos).read(b)[site] for b in batches]
    search: dict[str, Any] = {}
    if args.ce:
        search = {"splice": hooks_splice_runner(model, site, bos_token_id=bos), "token_batches": batches}
    r = mdl_report(sae, acts, precision=args.precision, tolerance=args.tolerance, **search)
    print(json.dumps(r, indent=1))
    print(f"{r['entropy_bits']:.1f} bits/token (bound L0·(B + log2 F) = {r['bound_bits']:.1f}) for the SAE vs "
          f"{r['dense_bits']:.1f} dense (d·B; per-dimension entropy {r['dense_entropy_bits']:.1f}) at precision "
          f"{r['precision']:.4g}; L0 {r['l0']:.2f}, FVU {r['fvu']:.4f} -> {r['fvu_quantized']:.4f} quantised")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("mdl", help="MDL description length (bits/token) of an SAE's latents vs dense activations")
    p.add_argument("sae", help="SAE folder/file (any supported format) or Hub repo")
    add_model_args(p)
    p.add_argument("--precision", type=float, help="quantisation bin width (default: searched)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="precision search: max FVU increase (or CE increase in nats with --ce)")
    p.add_argument("--ce", action="store_true", help="search the precision on the CE loss with the SAE spliced in")
    p.set_defaults(fn=cmd_mdl)
