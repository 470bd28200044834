#!/usr/bin/env python
"""Build the small causal LM that ships inside sae-hooks (``sae_hooks/data/default_model/``).

What it does, offline and deterministically given ``--seed`` (and the Python build, whose
standard library is the corpus):

1. **Corpus.** English documentation text of the running Python's standard library:

   * the language-reference topics that ``pydoc`` ships (``pydoc_data.topics``);
   * every docstring (module, class, function, method) of the pure-Python stdlib, read with
     ``ast`` from the source files -- nothing is imported, so no module side effects -- skipping
     test packages (``test``, ``tests``, ``idle_test``), ``lib2to3`` and ``site-packages``;
   * the ``__doc__`` of the built-in / C-extension modules and of their classes, functions and
     methods (``sys.builtin_module_names`` plus ``lib-dynload``).

   Docstrings are cleaned with ``inspect.cleandoc``; those shorter than ``--min-doc-chars`` are
   dropped and exact duplicates are kept once (first occurrence in the fixed order: topics
   sorted by name, source files sorted by path, C modules sorted by name). One *document* is one
   pydoc topic, one source file's docstrings, or one C module's docstrings.

2. **Split.** The documents are shuffled with ``random.Random(seed)``; documents are moved to the
   held-out set until it holds ``--heldout-frac`` of the characters. The rest is the train set.

3. **Tokenizer.** A byte-level BPE (``tokenizers``) trained on the *train* documents only, with
   ``<|endoftext|>`` as token id 0. It is BOS, EOS, PAD (and UNK) at once, as in GPT-2, and the
   tokenizer's post-processor prepends it to every encoded text, so position 0 is always BOS.

4. **Model.** A GPT-2-architecture ``GPT2LMHeadModel`` (tied embeddings, ``gelu_new``), trained
   from scratch with a plain PyTorch loop on CPU with ``torch.set_num_threads(1)``: AdamW, linear
   warm-up then cosine decay, gradient clipping. Each training sequence is BOS followed by
   ``n_positions - 1`` tokens taken at a random offset of the train token stream (documents are
   concatenated, each preceded by ``<|endoftext|>``).

5. **Evaluation.** Held-out cross-entropy (nats/token) over the whole held-out stream, cut into
   consecutive chunks of ``n_positions - 1`` tokens, each preceded by BOS (BOS itself is never a
   prediction target, everything after it is). Baseline: a unigram model whose token
   frequencies are estimated on the train stream (add-one smoothing), scored on the same targets.

6. **Output** (``--out``): ``config.json``, ``generation_config.json``, ``model.safetensors``
   (fp32), ``tokenizer.json``, ``tokenizer_config.json`` (+ whatever ``save_pretrained`` writes)
   and ``training_report.json``. The report also carries a few held-out *samples* (text, token
   ids, the model's loss on them) and the train unigram counts, so tests can recheck the numbers
   in seconds without the corpus.

Run from the repository root::

    python scripts/build_default_model.py            # defaults: 1100 steps, ~0.6 s/step on one
                                                     # idle CPU thread (~11 min); the shipped
                                                     # build took 27 min on a busy 2-core machine
    python scripts/build_default_model.py --steps 50 --out /tmp/dm   # quick smoke run
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

BOS = "<|endoftext|>"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "sae_hooks" / "data" / "default_model"

SKIP_DIRS = {"test", "tests", "idle_test", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
# C modules that are test helpers or examples, not documentation.
SKIP_C_PREFIXES = ("_test", "_xx", "xx", "_ctypes_test")


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------


def _clean(doc: str | None) -> str | None:
    if not doc or not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc).strip()
    return doc or None


def _source_docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of a module and its classes/functions, in source order (depth first)."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = _clean(ast.get_docstring(node, clean=False))
            if d:
                out.append(d)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _c_module_names(stdlib: Path) -> list[str]:
    names = set(sys.builtin_module_names)
    dynload = stdlib / "lib-dynload"
    if dynload.is_dir():
        for p in dynload.iterdir():
            if p.suffix in (".so", ".pyd"):
                names.add(p.name.split(".")[0])
    return sorted(n for n in names if not n.startswith(SKIP_C_PREFIXES))


def _c_module_docstrings(mod) -> list[str]:
    """Own ``__doc__`` of a C module, its functions, its classes and their (non-dunder) members."""
    out: list[str] = []

    def add(obj) -> None:
        d = _clean(getattr(obj, "__doc__", None))
        if d:
            out.append(d)

    add(mod)
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if inspect.isclass(obj):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            d = _clean(obj.__dict__.get("__doc__"))
            if d:
                out.append(d)
            for mname in sorted(obj.__dict__):
                if mname.startswith("__") and mname.endswith("__"):
                    continue  # slot wrappers: "Return self==value." boilerplate
                member = obj.__dict__[mname]
                if inspect.isroutine(member) or inspect.isdatadescriptor(member):
                    add(member)
        elif inspect.isroutine(obj):
            add(obj)
    return out


def collect_corpus(min_doc_chars: int) -> list[tuple[str, str]]:
    """Return ``[(doc_id, text), ...]`` in a fixed order, deduplicated at docstring level."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[tuple[str, str]] = []

    def add(doc_id: str, parts: list[str]) -> None:
        kept = []
        for p in parts:
            if len(p) < min_doc_chars or p in seen:
                continue
            seen.add(p)
            kept.append(p)
        if kept:
            docs.append((doc_id, "\n\n".join(kept)))

    # 1. pydoc's language-reference topics
    import pydoc_data.topics as topics

    for key in sorted(topics.topics):
        add(f"topic:{key}", [_clean(topics.topics[key]) or ""])

    # 2. pure-Python stdlib sources, read with ast (no imports)
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    for path in sorted(files, key=lambda p: p.relative_to(stdlib).as_posix()):
        rel = path.relative_to(stdlib).as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        add(f"py:{rel}", _source_docstrings(tree))

    # 3. built-in and C-extension modules
    for name in _c_module_names(stdlib):
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional modules (e.g. _tkinter) may be missing
            continue
        add(f"c:{name}", _c_module_docstrings(mod))
    return docs


def split_docs(docs, heldout_frac: float, seed: int):
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(t) for _, t in docs)
    held, n = set(), 0
    for i in order:
        if n >= heldout_frac * total:
            break
        held.add(i)
        n += len(docs[i][1])
    train = [d for i, d in enumerate(docs) if i not in held]
    # held-out in shuffled order (so its first documents are a random sample)
    heldout = [docs[i] for i in order if i in held]
    return train, heldout


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(BOS) == 0, tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, 0)],
            ),
        ]
    )
    return tok


def encode_stream(tok, docs) -> list[int]:
    """Concatenate documents, each preceded by BOS (=EOS of the previous one)."""
    bos = tok.token_to_id(BOS)
    stream: list[int] = []
    encs = tok.encode_batch([t for _, t in docs], add_special_tokens=False)
    for e in encs:
        stream.append(bos)
        stream.extend(e.ids)
    return stream


# --------------------------------------------------------------------------------------------
# training / evaluation
# --------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_frac: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_chunks(stream, bos: int, n_positions: int):
    """Consecutive chunks of ``n_positions - 1`` held-out tokens, each preceded by BOS."""
    import torch

    L = n_positions - 1
    return [torch.tensor([bos] + stream[i : i + L]) for i in range(0, len(stream), L)]


def eval_loss(model, chunks, batch_size: int = 32) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        # group equal lengths (only the last chunk is shorter)
        by_len: dict[int, list] = {}
        for c in chunks:
            by_len.setdefault(len(c), []).append(c)
        for n, group in sorted(by_len.items()):
            for i in range(0, len(group), batch_size):
                x = torch.stack(group[i : i + batch_size])
                logits = model(input_ids=x).logits[:, :-1].float()
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                )
                total += loss.item()
                count += x[:, 1:].numel()
    model.train()
    return total / count, count


def unigram_loss(train_stream, heldout_targets, vocab_size: int) -> tuple[float, list[int]]:
    counts = [0] * vocab_size
    for t in train_stream:
        counts[t] += 1
    denom = len(train_stream) + vocab_size
    logp = [math.log((c + 1) / denom) for c in counts]
    return -sum(logp[t] for t in heldout_targets) / len(heldout_targets), counts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-positions", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--heldout-frac", type=float, default=0.05)
    ap.add_argument("--min-doc-chars", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=100, help="log held-out loss every N steps (0: never)")
    ap.add_argument("--n-samples", type=int, default=4, help="held-out samples stored in the report")
    ap.add_argument("--sample-chars", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' trainer: deterministic, polite
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    # ---- corpus
    docs = collect_corpus(args.min_doc_chars)
    train_docs, heldout_docs = split_docs(docs, args.heldout_frac, args.seed)
    corpus_sha = hashlib.sha256("\x00".join(f"{i}\x01{t}" for i, t in docs).encode()).hexdigest()
    print(f"corpus: {len(docs)} documents, {sum(len(t) for _, t in docs):,} chars "
          f"(train {len(train_docs)}, held-out {len(heldout_docs)})", flush=True)

    # ---- tokenizer
    tok = train_tokenizer([t for _, t in train_docs], args.vocab_size)
    vocab_size = tok.get_vocab_size()
    bos = tok.token_to_id(BOS)
    train_stream = encode_stream(tok, train_docs)
    heldout_stream = encode_stream(tok, heldout_docs)
    print(f"tokens: train {len(train_stream):,}, held-out {len(heldout_stream):,}, vocab {vocab_size}", flush=True)

    # ---- model
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=bos,
        eos_token_id=bos,
        pad_token_id=bos,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    data = torch.tensor(train_stream, dtype=torch.long)
    L = args.n_positions - 1
    gen = torch.Generator().manual_seed(args.seed)
    chunks = heldout_chunks(heldout_stream, bos, args.n_positions)
    curve = []
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - L, (args.batch_size,), generator=gen)
        x = torch.stack([torch.cat([torch.tensor([bos]), data[s : s + L]]) for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  lr {lr:.2e}  train loss {loss.item():.4f}  "
                  f"{time.time() - t_train:7.1f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            # eval on a fixed subset to keep it cheap; the final eval uses everything
            held, _ = eval_loss(model, chunks[:40])
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4), "heldout_loss_subset": round(held, 4)})
            print(f"      held-out (first 40 chunks) {held:.4f}", flush=True)
    train_seconds = time.time() - t_train

    model.eval()
    heldout_loss, n_targets = eval_loss(model, chunks)
    targets = [t for c in chunks for t in c[1:].tolist()]
    assert len(targets) == n_targets
    uni_loss, counts = unigram_loss(train_stream, targets, vocab_size)
    print(f"held-out loss {heldout_loss:.4f} nats/token; unigram {uni_loss:.4f}", flush=True)

    # ---- save
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        unk_token=BOS,
        model_max_length=args.n_positions,
    )
    hf_tok.save_pretrained(out)
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic fast class
    # loads the same tokenizer.json in transformers 4.x and 5.x alike.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    # No "add_bos_token" key on purpose: in transformers 5 its presence makes the tokenizer
    # rebuild tokenizer.json's post-processor; BOS is prepended by that post-processor.
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    special = {k: BOS for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    # ---- held-out samples, scored through the *saved* tokenizer and model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch.nn.functional as F

    re_tok = AutoTokenizer.from_pretrained(out)
    re_model = AutoModelForCausalLM.from_pretrained(out).eval()
    samples = []
    for doc_id, text in heldout_docs[: args.n_samples]:
        text = text[: args.sample_chars]
        if len(text) == args.sample_chars and " " in text:
            text = text[: text.rindex(" ")]
        ids = re_tok(text)["input_ids"]
        assert ids[0] == bos, "tokenizer must prepend BOS"
        ids = ids[: args.n_positions]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = re_model(input_ids=x).logits[0, :-1]
        sample_loss = F.cross_entropy(logits, x[0, 1:]).item()
        samples.append({"doc_id": doc_id, "text": text, "input_ids": ids, "loss": sample_loss})

    size = sum(p.stat().st_size for p in out.iterdir())
    report = {
        "description": (
            "GPT-2-architecture causal LM trained from scratch on the English documentation text "
            "of the Python standard library (pydoc topics + docstrings); built by "
            "scripts/build_default_model.py"
        ),
        "corpus": {
            "source": f"Python {platform.python_version()} standard library: pydoc_data.topics, "
            "docstrings of pure-Python modules (ast), __doc__ of built-in/C-extension modules",
            "python": sys.version,
            "documents": len(docs),
            "chars": sum(len(t) for _, t in docs),
            "tokens": len(train_stream) + len(heldout_stream),
            "sha256": corpus_sha,
            "dedup": "exact docstring text, first occurrence kept",
            "min_doc_chars": args.min_doc_chars,
        },
        "split": {
            "method": f"documents shuffled with random.Random({args.seed}); held-out takes documents "
            f"until it has >= {args.heldout_frac} of the characters",
            "train_documents": len(train_docs),
            "train_chars": sum(len(t) for _, t in train_docs),
            "train_tokens": len(train_stream),
            "heldout_documents": len(heldout_docs),
            "heldout_chars": sum(len(t) for _, t in heldout_docs),
            "heldout_tokens": len(heldout_stream),
            "heldout_doc_ids": [i for i, _ in heldout_docs],
        },
        "tokenizer": {
            "type": "byte-level BPE (tokenizers), trained on the train split",
            "vocab_size": vocab_size,
            "bos_eos_pad_token": BOS,
            "bos_token_id": bos,
            "prepends_bos": True,
        },
        "model": {
            "architecture": "GPT2LMHeadModel",
            "params": n_params,
            "n_embd": args.n_embd,
            "n_layer": args.n_layer,
            "n_head": args.n_head,
            "n_positions": args.n_positions,
            "tie_word_embeddings": True,
            "dtype": "float32",
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.n_positions,
            "tokens_seen": args.steps * args.batch_size * args.n_positions,
            "epochs_over_train": round(args.steps * args.batch_size * L / len(train_stream), 3),
            "optimizer": f"AdamW(betas=(0.9, 0.95), weight_decay={args.weight_decay} on matrices)",
            "lr": args.lr,
            "schedule": f"linear warm-up {args.warmup} steps, cosine to {args.min_lr_frac} x lr",
            "grad_clip": args.grad_clip,
            "dropout": args.dropout,
            "seed": args.seed,
            "torch_threads": args.threads,
            "device": "cpu",
            "train_wall_seconds": round(train_seconds, 1),
            "total_wall_seconds": round(time.time() - t_start, 1),
            "curve": curve,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": __import__("tokenizers").__version__,
            },
        },
        "eval": {
            "heldout_loss": heldout_loss,
            "unigram_heldout_loss": uni_loss,
            "heldout_targets": n_targets,
            "units": "nats/token",
            "protocol": f"held-out stream cut into consecutive chunks of {L} tokens, each preceded "
            "by BOS; every token after BOS is a target. Unigram: add-one smoothed train counts.",
        },
        "size_bytes_without_report": size,
        "heldout_samples": samples,
        "unigram_train_counts": counts,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    for p in out.iterdir():
        p.chmod(0o644)  # save_pretrained writes some files 0600; this is package data
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB) in {time.time() - t_start:.0f}s", flush=True)
    return report


if __name__ == "__main__":
    main()
