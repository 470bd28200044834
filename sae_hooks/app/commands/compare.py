"""``sae-hooks compare SAE_A SAE_B``: one-to-one latent matching and the shared fraction."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._analysis import load_sae


def cmd_compare(args: argparse.Namespace) -> int:
    from ...eval.matching import match_latents

    a, b = load_sae(args.sae_a), load_sae(args.sae_b)
    m = match_latents(a, b, by=args.by, threshold=args.threshold, shared=args.shared, candidates=args.candidates,
                      progress=not args.no_progress)
    s = m.summary()
    print(json.dumps(s, indent=1))
    print(f"{s['shared']:,} of {min(s['latents_a'], s['latents_b']):,} latents shared ({100 * s['shared_fraction']:.1f}%: "
          f"{args.shared} cosine > {args.threshold}); orphans: {s['orphans_a']:,} in A, {s['orphans_b']:,} in B")
    if args.out:
        import os
        import tempfile

        from safetensors.torch import save

        data = save({"partner": m.partner, "decoder_cos": m.decoder_cos, "encoder_cos": m.encoder_cos,
                     "shared": m.shared.to(dtype=m.partner.dtype)})
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:  # written then renamed: never a half-written file
            f.write(data)
        os.replace(tmp, args.out)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("compare", help="match two SAEs' latents one-to-one (cross-seed similarity)")
    p.add_argument("sae_a", help="SAE folder/file (any supported format) or Hub repo")
    p.add_argument("sae_b")
    p.add_argument("--by", choices=["decoder", "encoder", "both"], default="decoder", help="what the matching maximises")
    p.add_argument("--shared", choices=["both", "decoder"], default="both",
                   help="a pair is shared when these cosines exceed --threshold")
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--candidates", type=int, default=32, help="partners kept per latent in the sparse search")
    p.add_argument("--out", help="also save the per-latent matching (partner, cosines, shared) as safetensors")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_compare)
