"""The nine iterations of the article as data, and the profiles that size them.

:func:`load_scenario` reads ``labkit/data/iterations.yaml`` (or another file of
the same shape), checks every field, and returns a :class:`Scenario`.
``Scenario.iteration(number, profile)`` gives a frozen :class:`Iteration`: the
article's setup with the profile's table sizes, CPU budget and run settings.
A bad file is refused with a :class:`~labkit.exceptions.ScenarioError` naming
the file, the field and what is allowed.

A profile maps each article value of a sysctl to its own value
(``sysctl_values``), so that every lab value can be shown beside the article's,
and may override any field of one iteration (``iterations: {N: {field: value}}``).
Profiles live in the data file or in a file of their own
(:func:`load_profile`, written by ``labkit calibrate``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from labkit.exceptions import LabkitError, ScenarioError
from labkit.host import sysctl_name

DATA_FILE = Path(__file__).parent / "data" / "iterations.yaml"
SETUPS = ("plain", "nodeport")
PROXY_MODES = ("iptables", "nftables")
ARTICLE_ITERATIONS = tuple(range(1, 10))  # the article's nine; 10 and up go past it
REQUIRED_PROFILES = ("article", "lab", "quick")


@dataclass(frozen=True)
class Iteration:
    """One iteration of the story, sized by a profile.

    Attributes:
        number: 1..9 the article's, 10-12 past it.
        title: one line.
        setup: ``plain`` (the server as a process on the node, no NAT) or
            ``nodeport`` (pods behind a NodePort service).
        node_sysctls: dotted name -> value, global ones included.
        pod_sysctls: the Deployment's ``securityContext.sysctls``.
        allowed_unsafe_sysctls: the kubelet's ``allowedUnsafeSysctls`` patterns.
        replicas: the Deployment's replicas (1 for the plain server).
        cpu_limit: CPU cores per pod (the plain server gets the same), None for no limit.
        pods_track_conntrack: whether the pods' namespaces track connections.
        article_tps: the article's transfers/s.
        observed: what the article saw.
        duration_s, cooldown_s, concurrency, file_size: run settings of the profile.
        profile: the profile's name.
        background_flows: short-lived flows per second the netns testbed's machine keeps going
            in namespaces of their own, so that the kernel's conntrack garbage collector runs on
            a busy node's cycle (:mod:`labkit.background`); 0 for none.
        node_notrack: a raw-table NOTRACK rule for the NodePort traffic on the node (iteration 11).
        proxy_mode: the node's rules as kube-proxy renders them in ``iptables`` or
            ``nftables`` mode (iteration 12).
    """

    number: int
    title: str
    setup: str
    node_sysctls: Mapping[str, int]
    pod_sysctls: Mapping[str, int]
    allowed_unsafe_sysctls: tuple[str, ...]
    replicas: int
    cpu_limit: float | None
    pods_track_conntrack: bool
    article_tps: int
    observed: str
    duration_s: float
    cooldown_s: float
    concurrency: int
    file_size: int
    profile: str
    background_flows: int = 0
    node_notrack: bool = False
    proxy_mode: str = "iptables"

    @property
    def past_article(self) -> bool:
        """True for the iterations after the article's nine (10-12)."""
        return self.number not in ARTICLE_ITERATIONS

    @property
    def global_sysctls(self) -> dict[str, int]:
        """The node sysctls only the initial namespace may set."""
        from labkit.sysctls import is_global
        return {k: v for k, v in self.node_sysctls.items() if is_global(k)}

    @property
    def namespaced_node_sysctls(self) -> dict[str, int]:
        """The node sysctls set in the node's own namespace."""
        from labkit.sysctls import is_global
        return {k: v for k, v in self.node_sysctls.items() if not is_global(k)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["node_sysctls"] = dict(self.node_sysctls)
        out["pod_sysctls"] = dict(self.pod_sysctls)
        out["allowed_unsafe_sysctls"] = list(self.allowed_unsafe_sysctls)
        return out


# --- validation helpers -----------------------------------------------------------

class _Checker:
    """Carries the file name so every refusal names the file and the field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, field: str, message: str) -> ScenarioError:
        return ScenarioError(message, path=self.path, field=field)

    def mapping(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be a mapping, got {_show(value)}")
        return value

    def keys(self, value: dict, field: str, allowed: set[str], required: set[str]) -> None:
        unknown = sorted(set(map(str, value)) - allowed)
        if unknown:
            raise self.fail(f"{field}.{unknown[0]}" if field else unknown[0],
                            f"unknown field; allowed: {', '.join(sorted(allowed))}")
        missing = sorted(required - set(value))
        if missing:
            raise self.fail(f"{field}.{missing[0]}" if field else missing[0], "missing")

    def integer(self, value: Any, field: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(field, f"must be an integer >= {minimum}, got {_show(value)}")
        return value

    def number(self, value: Any, field: str, *, allow_none: bool = False, positive: bool = True) -> float | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            what = "a positive number" + (" or null" if allow_none else "")
            raise self.fail(field, f"must be {what}, got {_show(value)}")
        return float(value)

    def text(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"must be non-empty text, got {_show(value)}")
        return value.strip()

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {_show(value)}")
        return value

    def choice(self, value: Any, field: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(field, f"must be one of {', '.join(allowed)}, got {_show(value)}")
        return value

    def sysctls(self, value: Any, field: str) -> dict[str, int]:
        out = {}
        for name, v in self.mapping(value if value is not None else {}, field).items():
            try:
                dotted = sysctl_name(str(name))
            except LabkitError as exc:
                raise self.fail(f"{field}.{name}", str(exc)) from None
            out[dotted] = self.integer(v, f"{field}.{name}")
        return out

    def patterns(self, value: Any, field: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list of sysctl names or patterns, got {_show(value)}")
        out = []
        for i, p in enumerate(value):
            if not isinstance(p, str) or not p or ("*" in p and not p.endswith("*")) or p.count("*") > 1:
                raise self.fail(f"{field}[{i}]", f"must be a sysctl name or a pattern ending in '*', got {_show(p)}")
            out.append(p)
        return tuple(out)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Fields of an iteration in the data file and how each is checked.
_ITERATION_FIELDS: dict[str, Callable[[_Checker, Any, str], Any]] = {
    "number": lambda c, v, f: c.integer(v, f, 1),
    "title": lambda c, v, f: c.text(v, f),
    "setup": lambda c, v, f: c.choice(v, f, SETUPS),
    "node_sysctls": lambda c, v, f: c.sysctls(v, f),
    "pod_sysctls": lambda c, v, f: c.sysctls(v, f),
    "allowed_unsafe_sysctls": lambda c, v, f: c.patterns(v, f),
    "replicas": lambda c, v, f: c.integer(v, f, 1),
    "article_tps": lambda c, v, f: c.integer(v, f, 0),
    "observed": lambda c, v, f: c.text(v, f),
    # May come from the profile instead (see _PROFILE_ITERATION_DEFAULTS).
    "cpu_limit": lambda c, v, f: c.number(v, f, allow_none=True),
    "pods_track_conntrack": lambda c, v, f: c.boolean(v, f),
    "background_flows": lambda c, v, f: c.integer(v, f, 0),
    # Past the article (iterations 10-12); optional, with the defaults of Iteration.
    "node_notrack": lambda c, v, f: c.boolean(v, f),
    "proxy_mode": lambda c, v, f: c.choice(v, f, PROXY_MODES),
}
_FROM_PROFILE = ("cpu_limit", "pods_track_conntrack", "background_flows")
_OPTIONAL = ("node_notrack", "proxy_mode")
_RUN_FIELDS: dict[str, Callable[[_Checker, Any, str], Any]] = {
    "duration_s": lambda c, v, f: c.number(v, f),
    "cooldown_s": lambda c, v, f: c.number(v, f, positive=False) if v != 0 else 0.0,
    "concurrency": lambda c, v, f: c.integer(v, f, 1),
    "file_size": lambda c, v, f: c.integer(v, f, 1),
}
_PROFILE_KEYS = {"description", "run", "cpu_limit", "pods_track_conntrack", "background_flows",
                 "sysctl_values", "iterations", "name", "derived_from", "calibration"}


@dataclass(frozen=True)
class Profile:
    """How a profile sizes the iterations.

    Attributes:
        name: article, lab, quick or a calibrated one.
        description: what it is for.
        run: duration_s, cooldown_s, concurrency, file_size.
        cpu_limit: CPU cores per pod (None: no limit).
        pods_track_conntrack: the default for every iteration.
        background_flows: the default for every iteration (see :class:`Iteration`).
        sysctl_values: sysctl -> {article value -> profile value}.
        overrides: iteration number -> {field: value} (checked fields).
        source: the file it came from.
        extra: other top-level keys kept as they are (e.g. ``calibration`` notes).
    """

    name: str
    description: str
    run: Mapping[str, Any]
    cpu_limit: float | None
    pods_track_conntrack: bool
    sysctl_values: Mapping[str, Mapping[int, int]]
    overrides: Mapping[int, Mapping[str, Any]]
    source: str
    extra: Mapping[str, Any]
    background_flows: int = 0

    def value(self, sysctl: str, article_value: int) -> int:
        """The profile's value of ``sysctl`` for the article's ``article_value``."""
        table = self.sysctl_values.get(sysctl)
        return table.get(article_value, article_value) if table else article_value


def _check_profile(c: _Checker, name: str, raw: Any, numbers: set[int], where: str) -> Profile:
    raw = c.mapping(raw, where)
    c.keys(raw, where, _PROFILE_KEYS, {"run"})
    run_raw = c.mapping(raw["run"], f"{where}.run")
    c.keys(run_raw, f"{where}.run", set(_RUN_FIELDS), set(_RUN_FIELDS))
    run = {k: check(c, run_raw[k], f"{where}.run.{k}") for k, check in _RUN_FIELDS.items()}
    cpu = c.number(raw.get("cpu_limit"), f"{where}.cpu_limit", allow_none=True)
    track = c.boolean(raw.get("pods_track_conntrack", True), f"{where}.pods_track_conntrack")
    flows = c.integer(raw.get("background_flows", 0), f"{where}.background_flows", 0)
    values: dict[str, dict[int, int]] = {}
    for sysctl, table in c.mapping(raw.get("sysctl_values") or {}, f"{where}.sysctl_values").items():
        field = f"{where}.sysctl_values.{sysctl}"
        try:
            dotted = sysctl_name(str(sysctl))
        except LabkitError as exc:
            raise c.fail(field, str(exc)) from None
        values[dotted] = {c.integer(k, f"{field} (article value)"): c.integer(v, f"{field}.{k}")
                          for k, v in c.mapping(table, field).items()}
    overrides: dict[int, dict[str, Any]] = {}
    for num, over in c.mapping(raw.get("iterations") or {}, f"{where}.iterations").items():
        field = f"{where}.iterations.{num}"
        if num not in numbers:
            raise c.fail(field, f"no such iteration; iterations are {sorted(numbers)}")
        over = c.mapping(over, field)
        allowed = (set(_ITERATION_FIELDS) | set(_RUN_FIELDS)) - {"number"}
        c.keys(over, field, allowed, set())
        checks = {**_ITERATION_FIELDS, **_RUN_FIELDS}
        overrides[num] = {k: checks[k](c, v, f"{field}.{k}") for k, v in over.items()}
    extra = {k: copy.deepcopy(v) for k, v in raw.items() if k in ("derived_from", "calibration")}
    return Profile(name, str(raw.get("description", "")).strip(), run, cpu, track, values, overrides,
                   c.path, extra, flows)


class Scenario:
    """The iterations and their profiles, checked.

    Attributes:
        path: the data file.
        profiles: profile name -> :class:`Profile`.
        numbers: the iteration numbers, in order.
    """

    def __init__(self, path: str, iterations: dict[int, dict[str, Any]], profiles: dict[str, Profile]):
        self.path = path
        self._iterations = iterations
        self.profiles = profiles

    @property
    def numbers(self) -> list[int]:
        """The iteration numbers, in order."""
        return sorted(self._iterations)

    def _profile(self, profile: "str | Profile") -> Profile:
        if isinstance(profile, Profile):
            return profile
        if profile in self.profiles:
            return self.profiles[profile]
        if isinstance(profile, (str, Path)) and (str(profile).endswith((".yaml", ".yml"))):
            return self.add_profile(load_profile(profile, self))
        raise ScenarioError(f"unknown profile {profile!r}; profiles are {', '.join(self.profiles)} "
                            "or a profile file (*.yaml)", path=self.path, field="profiles")

    def iteration(self, number: int, profile: "str | Profile" = "lab") -> Iteration:
        """Return iteration ``number`` sized by ``profile`` (a name, a Profile or a profile file).

        Raises:
            ScenarioError: no such iteration or profile, or the profile lacks a value.
        """
        if number not in self._iterations:
            raise ScenarioError(f"no iteration {number!r}; iterations are {self.numbers}",
                                path=self.path, field="iterations")
        prof = self._profile(profile)
        base = dict(self._iterations[number])
        over = dict(prof.overrides.get(number, {}))
        node = {k: prof.value(k, v) for k, v in base["node_sysctls"].items()}
        pod = {k: prof.value(k, v) for k, v in base["pod_sysctls"].items()}
        values = {
            **base, "node_sysctls": node, "pod_sysctls": pod,
            "cpu_limit": base.get("cpu_limit", prof.cpu_limit),
            "pods_track_conntrack": base.get("pods_track_conntrack", prof.pods_track_conntrack),
            "background_flows": base.get("background_flows", prof.background_flows),
            **prof.run, "profile": prof.name,
        }
        values.update(over)
        values["node_sysctls"] = dict(values["node_sysctls"])
        values["pod_sysctls"] = dict(values["pod_sysctls"])
        return Iteration(**values)

    def iterations(self, profile: "str | Profile" = "lab") -> list[Iteration]:
        """Every iteration, in order, sized by ``profile``."""
        return [self.iteration(n, profile) for n in self.numbers]

    def add_profile(self, profile: Profile) -> Profile:
        """Add (or replace) a profile, e.g. one written by ``labkit calibrate``; returns it."""
        self._check_covers(profile)
        self.profiles[profile.name] = profile
        return profile

    def _check_covers(self, prof: Profile) -> None:
        """Refuse a profile that maps some article values of a sysctl but not all of them,
        or maps a sysctl no iteration sets (a typo would silently change nothing)."""
        used = {name for it in self._iterations.values() for section in ("node_sysctls", "pod_sysctls")
                for name in it[section]}
        for name in prof.sysctl_values:
            if name not in used:
                raise ScenarioError(f"no iteration sets {name}; the sysctls they set: {', '.join(sorted(used))}",
                                    path=prof.source, field=f"profiles.{prof.name}.sysctl_values.{name}")
        for num, it in self._iterations.items():
            for section in ("node_sysctls", "pod_sysctls"):
                for name, value in it[section].items():
                    table = prof.sysctl_values.get(name)
                    if table and value not in table:
                        raise ScenarioError(
                            f"maps some values of {name} but not {value}, which iteration {num} uses",
                            path=prof.source, field=f"profiles.{prof.name}.sysctl_values.{name}")

    def article_values(self, profile: "str | Profile" = "lab") -> list[dict[str, Any]]:
        """Each sysctl of each iteration: the article's value beside the profile's (tidy rows).

        Returns:
            Rows {iteration, where (node|pod), sysctl, article, <profile name>}.
        """
        prof = self._profile(profile)
        rows = []
        for n in self.numbers:
            it = self.iteration(n, prof)
            for where in ("node", "pod"):
                article = self._iterations[n][f"{where}_sysctls"]
                for name, value in article.items():
                    rows.append({"iteration": n, "where": where, "sysctl": name, "article": value,
                                 "value": getattr(it, f"{where}_sysctls")[name], "profile": prof.name})
        return rows


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror}", path=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise ScenarioError(f"not valid YAML: {getattr(exc, 'problem', exc)}", path=str(path),
                            field=where) from None


def parse_scenario(data: Any, path: str = "<data>") -> Scenario:
    """Check a parsed data file and return the :class:`Scenario` (pure; see :func:`load_scenario`)."""
    c = _Checker(path)
    data = c.mapping(data, "")
    c.keys(data, "", {"version", "iterations", "profiles"}, {"version", "iterations", "profiles"})
    if data["version"] != 1:
        raise c.fail("version", f"must be 1, got {_show(data['version'])}")
    if not isinstance(data["iterations"], list) or not data["iterations"]:
        raise c.fail("iterations", "must be a non-empty list")
    iterations: dict[int, dict[str, Any]] = {}
    required = set(_ITERATION_FIELDS) - set(_FROM_PROFILE) - set(_OPTIONAL)
    for i, raw in enumerate(data["iterations"]):
        field = f"iterations[{i}]"
        raw = c.mapping(raw, field)
        c.keys(raw, field, set(_ITERATION_FIELDS), required)
        it = {k: check(c, raw[k], f"{field}.{k}") for k, check in _ITERATION_FIELDS.items() if k in raw}
        if it["number"] in iterations:
            raise c.fail(f"{field}.number", f"iteration {it['number']} appears twice")
        if it["setup"] == "plain" and (it["pod_sysctls"] or it["replicas"] != 1):
            raise c.fail(field, "a plain setup has no pods: pod_sysctls must be empty and replicas 1")
        iterations[it["number"]] = it
    if sorted(iterations) != list(range(1, len(iterations) + 1)):
        raise c.fail("iterations", f"numbers must run 1..{len(iterations)}, got {sorted(iterations)}")
    profiles_raw = c.mapping(data["profiles"], "profiles")
    for name in REQUIRED_PROFILES:
        if name not in profiles_raw:
            raise c.fail(f"profiles.{name}", f"missing; required profiles: {', '.join(REQUIRED_PROFILES)}")
    scenario = Scenario(path, iterations, {})
    for name, raw in profiles_raw.items():
        scenario.add_profile(_check_profile(c, str(name), raw, set(iterations), f"profiles.{name}"))
    return scenario


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Read and check a data file (``labkit/data/iterations.yaml`` by default).

    Raises:
        ScenarioError: the file cannot be read, is not YAML, or a field is wrong.
    """
    path = Path(path) if path else DATA_FILE
    return parse_scenario(_read_yaml(path), str(path))


def parse_profile(data: Any, name: str | None = None, scenario: Scenario | None = None,
                  source: str = "<profile>") -> Profile:
    """Check one profile given as data (``name`` plus the fields of a profile) and return it.

    Args:
        data: the parsed profile, e.g. what ``labkit calibrate`` derived.
        name: its name when ``data`` has none.
        scenario: check that it maps every article value the iterations use.
        source: where it came from, for messages.

    Raises:
        ScenarioError: a field is wrong.
    """
    c = _Checker(source)
    data = c.mapping(data, "")
    name = c.text(data.get("name", name), "name")
    numbers = set(scenario.numbers) if scenario else set(range(1, 10))
    profile = _check_profile(c, name, data, numbers, "profile")
    if scenario is not None:
        scenario._check_covers(profile)
    return profile


def load_profile(path: str | Path, scenario: Scenario | None = None) -> Profile:
    """Read a profile file (one profile: ``name`` plus the fields of a profile).

    Raises:
        ScenarioError: the file or a field is wrong.
    """
    path = Path(path)
    return parse_profile(_read_yaml(path), path.stem, scenario, str(path))


def with_overrides(iteration: Iteration, **changes: Any) -> Iteration:
    """A copy of ``iteration`` with some fields changed (tests, notebooks' what-ifs)."""
    return replace(iteration, **changes)
