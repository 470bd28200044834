"""What ``sae-hooks train`` trains: the objectives named by the flags, by repeated ``--sae`` groups or by a
``--config`` file, expanded into one :class:`Planned` model per (objective, site, seed).

An *objective group* is a set of keys, each the name of a ``train`` flag without its dashes (``site``,
``arch``, ``k``, ``d_sae``, ``lr``, ...; see :data:`OBJECTIVE_KEYS`). Values are checked with the flag's own
type and choices, so ``k=0`` in a group fails as ``--k 0`` does. Keys a group does not give come from the
flags (so ``--k 16`` is the default of every group). Lists (``site``, ``seeds``, ``matryoshka_widths``) are
space-separated in a ``--sae`` group and lists in a config file.

* ``--sae 'site=blocks.0.hook_resid_post,arch=topk,k=32'`` (repeatable): one group per flag;
* ``--config run.toml`` (or ``.json``): ``[[sae]]`` tables, one per group; top-level objective keys are
  defaults for every group;
* neither: one group from the flags (``--site`` ... as before).

What a group trains (``objective``, inferred when not given):

* ``sae``: one SAE per site (and per seed); ``*`` in a site stands for every layer index
  (``blocks.*.hook_resid_post``);
* ``transcoder`` (``site_out`` given): from each ``site`` to the matching ``site_out``;
* ``mlsae`` (``arch=mlsae``): ONE multi-layer SAE over all the group's sites (default ``blocks.*.hook_resid_post``);
* ``jsae``: a Jacobian SAE pair around the MLP of ``layer`` (input ``blocks.L.ln2.hook_out``, output
  ``blocks.L.hook_mlp_out``), or around the MLP between ``site`` and ``site_out``.

All planned models train together: one forward pass of the model reads every site they need.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, HookNotFoundError, did_you_mean

#: Keys an objective group may set (the ``train`` flags of the same name, dashes as underscores).
OBJECTIVE_KEYS = (
    "objective", "site", "site_out", "layer", "skip", "arch", "d_sae", "expansion", "k", "lr", "l1", "l0",
    "warmup", "dead_tokens", "optimizer", "pam_round_steps", "matryoshka_widths", "capacities", "choice_aux",
    "seeds", "jacobian_coefficient", "name",
)
OBJECTIVES = ("sae", "transcoder", "mlsae", "jsae")
LIST_KEYS = ("site", "site_out", "seeds", "matryoshka_widths")
DEFAULT_MLSAE_SITES = "blocks.*.hook_resid_post"


@dataclass
class Group:
    """One objective group: every key's value (given or from the flags) and the keys given explicitly."""

    values: dict[str, Any]
    given: dict[str, Any] = field(default_factory=dict)
    where: str = "the flags"

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def objective(self) -> str:
        v = self.values
        if v["objective"]:
            return v["objective"]
        if v["arch"] == "mlsae":
            return "mlsae"
        return "transcoder" if v["site_out"] else "sae"


@dataclass
class Planned:
    """One model to train: its entry name, objective, the sites it reads (a transcoder: input then target; a
    Jacobian pair: the MLP input), the pair's MLP output site and layer, its init seed and its group."""

    name: str
    objective: str
    sites: list[str]
    seed: int
    group: Group
    site_out: str | None = None
    layer: int | None = None


# Parsing ------------------------------------------------------------------------------------------------


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest in OBJECTIVE_KEYS}


def _convert(action: argparse.Action, key: str, raw: Any, where: str) -> Any:
    """``raw`` (a string, a number, a bool or a list of them) checked and converted as the flag would be."""
    flag = action.option_strings[0] if action.option_strings else key

    def one(item: Any) -> Any:
        if isinstance(action, argparse._StoreTrueAction):
            if isinstance(item, bool):
                return item
            text = str(item).lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{where}: {key}={item!r}: {flag} is true or false")
            return text in ("true", "1", "yes")
        try:
            value = action.type(str(item)) if action.type is not None else str(item)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {key}={item!r}: {e} (as for {flag})") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{where}: {key}={item!r} is not one of {list(action.choices)} (as for {flag})")
        return value

    if key in LIST_KEYS:
        items = raw.split() if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else [raw]
        if not items:
            raise ConfigError(f"{where}: {key} is empty")
        return [one(i) for i in items]
    if isinstance(raw, (list, tuple)):
        raise ConfigError(f"{where}: {key} takes one value, got a list {raw!r}")
    return one(raw)


def _group(defaults: dict[str, Any], given_raw: dict[str, Any], actions: dict[str, argparse.Action],
           run_keys: Sequence[str], where: str) -> Group:
    given: dict[str, Any] = {}
    for key, raw in given_raw.items():
        key = key.replace("-", "_")
        if key not in OBJECTIVE_KEYS:
            if key in run_keys:
                hint = " (the init seeds of a group are seeds=)" if key == "seed" else ""
                raise ConfigError(f"{where}: {key!r} is a setting of the whole run: give it as --{key.replace('_', '-')}{hint}")
            raise ConfigError(f"{where}: unknown key {key!r}.{did_you_mean(key, OBJECTIVE_KEYS)} "
                              f"Keys of an objective group: {list(OBJECTIVE_KEYS)}")
        if key == "name":
            given[key] = str(raw)
        else:
            given[key] = _convert(actions[key], key, raw, where)
    return Group({**defaults, **given}, given, where)


def parse_sae_flag(text: str, index: int, defaults: dict[str, Any], actions: dict[str, argparse.Action],
                   run_keys: Sequence[str]) -> Group:
    """One ``--sae 'key=value,key=value'`` group (``index`` counts from 1, for messages)."""
    where = f"--sae #{index} ({text!r})"
    raw: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{where}: {part!r} is not key=value")
        key = key.strip().replace("-", "_")
        if key in raw:
            raise ConfigError(f"{where}: {key!r} is given twice (a list is space-separated: {key}='a b')")
        raw[key] = value.strip()
    if not raw:
        raise ConfigError(f"{where}: empty; give key=value pairs, e.g. 'site=blocks.0.hook_resid_post,k=32'")
    return _group(defaults, raw, actions, run_keys, where)


def read_config(path: str | Path) -> dict[str, Any]:
    """A ``--config`` file: TOML (``.toml``) or JSON (anything else)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # pragma: no cover - Python 3.10
                raise ConfigError(f"{path}: TOML configs need Python 3.11 (tomllib); write the same as JSON") from None
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table/object with a list 'sae'")
    return data


def config_groups(path: str | Path, defaults: dict[str, Any], actions: dict[str, argparse.Action],
                  run_keys: Sequence[str]) -> list[Group]:
    """The ``[[sae]]`` groups of a config file; its top-level objective keys are defaults of every group."""
    data = read_config(path)
    groups = data.pop("sae", None)
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise ConfigError(f"{path}: needs a non-empty list of objective groups under 'sae' ([[sae]] tables in TOML)")
    top = _group(defaults, data, actions, run_keys, f"{path} (top level)")
    return [_group(top.values, g, actions, run_keys, f"{path} [[sae]] #{i}") for i, g in enumerate(groups, 1)]


def groups_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Group]:
    """Every objective group of a parsed ``train`` command line."""
    actions = _actions(parser)
    run_keys = [a.dest for a in parser._actions if a.dest not in OBJECTIVE_KEYS]
    defaults = {k: getattr(args, k) for k in OBJECTIVE_KEYS}
    if not args.sae and not args.config:
        return [Group(defaults)]
    if args.site or args.site_out:
        raise ConfigError("give the sites inside each --sae group / config entry (site=...), not with --site")
    out = []
    if args.config:
        out += config_groups(args.config, defaults, actions, run_keys)
    out += [parse_sae_flag(t, i, defaults, actions, run_keys) for i, t in enumerate(args.sae or [], 1)]
    return out


# Checks that need no model ----------------------------------------------------------------------------


def check_group(g: Group, replay: bool = False) -> None:
    """Refuse inconsistent keys before any work (the message names the keys as flags). ``replay``: training on
    saved activations, where an SAE group without sites trains at every saved site."""
    from ..saes.registry import sae_class

    v, obj, where = g.values, g.objective, g.where
    if obj not in OBJECTIVES:
        raise ConfigError(f"{where}: objective {obj!r} is not one of {list(OBJECTIVES)}")
    if obj == "mlsae" and v["arch"] not in ("mlsae", "topk"):
        raise ConfigError(f"{where}: a multi-layer SAE is a TopK SAE (--arch mlsae), not --arch {v['arch']}")
    if obj == "jsae" and v["arch"] not in ("topk",):
        raise ConfigError(f"{where}: a Jacobian SAE pair is two TopK SAEs; drop --arch {v['arch']}")
    if obj != "jsae" and v["layer"] is not None:
        raise ConfigError(f"{where}: --layer names the MLP of a Jacobian pair (--objective jsae)")
    if obj == "jsae":
        if v["layer"] is None and not (v["site"] and v["site_out"]):
            raise ConfigError(f"{where}: a Jacobian pair needs --layer L, or --site (MLP input) and --site-out (MLP output)")
        if v["site"] and v["site_out"] and (len(v["site"]) != 1 or len(v["site_out"]) != 1):
            raise ConfigError(f"{where}: a Jacobian pair sits around one MLP: one --site and one --site-out")
    if obj == "sae" and v["site_out"]:
        raise ConfigError(f"{where}: --site-out makes a transcoder (objective transcoder), not an SAE")
    if obj == "transcoder":
        if not v["site_out"] or len(v["site_out"]) != len(v["site"] or []):
            raise ConfigError(f"{where}: give one --site-out per --site (transcoders), got "
                              f"{len(v['site_out'] or [])} for {len(v['site'] or [])}")
    if obj in ("mlsae", "jsae") and v["optimizer"] != "adam":
        raise ConfigError(f"{where}: --optimizer {v['optimizer']} trains single-site SAEs; {obj} trains with adam")
    uses_k = obj in ("mlsae", "jsae") or sae_class(v["arch"]).uses_k
    if v["d_sae"] is not None and uses_k and v["k"] > v["d_sae"]:
        raise ConfigError(f"{where}: --k ({v['k']}) must be <= --d-sae ({v['d_sae']})")
    if len(set(v["seeds"])) != len(v["seeds"]):
        raise ConfigError(f"{where}: --seeds has repeats: {v['seeds']}")
    if v["matryoshka_widths"] and v["arch"] != "matryoshka":
        raise ConfigError(f"{where}: --matryoshka-widths is for --arch matryoshka")
    if obj == "transcoder" or (obj == "sae" and not replay):
        if not v["site"]:
            raise ConfigError(f"{where}: give at least one --site")


# Expansion against a model's (or an activation folder's) sites ----------------------------------------


def expand_site(pattern: str, exists: Callable[[str], bool]) -> list[str]:
    """``pattern`` itself, or with its one ``*`` replaced by 0, 1, 2, ... for as long as the site exists."""
    if "*" not in pattern:
        return [pattern]
    if pattern.count("*") > 1:
        raise ConfigError(f"site {pattern!r}: one '*' (the layer index) per site")
    out = []
    while exists(site := pattern.replace("*", str(len(out)))):
        out.append(site)
    if not out:
        raise HookNotFoundError(f"no site matches {pattern!r} ({pattern.replace('*', '0')!r} does not exist)")
    return out


def _layer_of(site: str) -> int | None:
    m = re.search(r"\.(\d+)(?:\.|:|$)", site)
    return int(m.group(1)) if m else None


def _short(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def plan(groups: Sequence[Group], exists: Callable[[str], bool], all_sites: Sequence[str] | None = None) -> list[Planned]:
    """Every model to train, with unique entry names (the checkpoint's keys: the same command gives the same
    names, so ``--resume`` finds them). ``exists(site)`` says whether a site exists; ``all_sites`` (saved
    activations) are where an SAE group without sites trains."""
    from ..saes.jacobian import jsae_hooks

    out: list[Planned] = []
    for g in groups:
        v, obj = g.values, g.objective
        todo: list[tuple[str, list[str], str | None, int | None]] = []  # (base name, sites, site_out, layer)
        if obj == "sae":
            for pattern in v["site"] or list(all_sites or []):
                for s in expand_site(pattern, exists):
                    todo.append((f"{s}-{v['arch']}", [s], None, None))
        elif obj == "transcoder":
            for s, t in zip(v["site"], v["site_out"]):
                todo.append((f"{s}-{v['arch']}-tc", [s, t], None, None))
        elif obj == "mlsae":
            sites = [s for p in (v["site"] or [DEFAULT_MLSAE_SITES]) for s in expand_site(p, exists)]
            if len(set(sites)) != len(sites):
                raise ConfigError(f"{g.where}: the multi-layer SAE's sites repeat: {sites}")
            todo.append((f"mlsae-{sites[0]}-x{len(sites)}", sites, None, None))
        else:  # jsae
            if v["site"]:
                hook_in, hook_out = v["site"][0], v["site_out"][0]
                layer = v["layer"] if v["layer"] is not None else _layer_of(hook_out)
                if layer is None:
                    raise ConfigError(f"{g.where}: no layer index in {hook_out!r}; give --layer")
            else:
                layer = v["layer"]
                hook_in, hook_out = jsae_hooks(layer, bridge=True)  # the MLP's input after ln2's affine
            todo.append((f"jsae-L{layer}", [hook_in], hook_out, layer))
        for base, sites, site_out, layer in todo:
            for seed in v["seeds"]:
                name = v["name"] if v["name"] and len(todo) == 1 else f"{v['name']}-{base}" if v["name"] else base
                if len(v["seeds"]) > 1 or not v["name"]:
                    name = f"{name}-s{seed}"
                out.append(Planned(name.replace("/", "_"), obj, sites, seed, g, site_out, layer))
    _unique_names(out)
    return out


def _unique_names(planned: list[Planned]) -> None:
    """Names that collide (two groups training at the same site) get the keys their group set, e.g. ``-k16``."""
    counts: dict[str, int] = {}
    for p in planned:
        counts[p.name] = counts.get(p.name, 0) + 1
    for p in planned:
        if counts[p.name] > 1 and not p.group.values["name"]:
            extra = [f"{k}{_short(v)}" for k, v in p.group.given.items()
                     if k not in ("site", "site_out", "arch", "seeds", "objective", "name")]
            if extra:
                p.name = f"{p.name}-{'-'.join(extra)}".replace(" ", "_").replace("/", "_")
    seen: dict[str, Planned] = {}
    for p in planned:
        if p.name in seen:
            raise ConfigError(f"{p.group.where} and {seen[p.name].group.where} both train {p.name!r}: give each a name=")
        seen[p.name] = p
