"""The article's own commands, run for real on a testbed's hosts and shown in a notebook.

:func:`sh` runs one command as a role of the running testbed (``node``,
``pod-N``, ``client``, ``init``: the machine's own namespace) over the same
:class:`~labkit.host.Host` layer as ``labkit exec``, and returns a
:class:`Shown`: the :class:`~labkit.host.Result` with the role, and a small
DataFrame where the output is a table (``conntrack -S``).  A notebook shows it
as the prompt, the command and what it printed (its exit code and stderr when
it failed): a refused command is part of the story, not an exception.

Parsers are pure functions over captured text.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from labkit.host import Result

_FIELD = re.compile(r"(\w+)=(\S+)")


def conntrack_S_table(text: str) -> pd.DataFrame:
    """``conntrack -S`` output as a DataFrame: one row per CPU, one column per counter.

    Args:
        text: lines such as ``cpu=0 found=0 invalid=12 insert=0 insert_failed=0 drop=3
            early_drop=40 error=0 search_restart=0 ...``.

    Returns:
        Integer columns (``cpu`` first, as the index), plus a ``total`` row.
        Lines without ``cpu=`` are skipped.
    """
    rows = []
    for line in text.splitlines():
        fields = dict(_FIELD.findall(line))
        if "cpu" in fields:
            rows.append({k: int(v) for k, v in fields.items() if v.lstrip("-").isdigit()})
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).fillna(0).astype("int64").set_index("cpu")
    frame.loc["total"] = frame.sum()
    return frame


def expect_list_tail(text: str) -> int | None:
    """The number in ``conntrack -L expect``'s last line (``... N expectations have been shown.``)."""
    found = re.search(r"(\d+) expectations? ha(?:ve|s) been shown", text)
    return int(found.group(1)) if found else None


TABLE_PARSERS = (
    (re.compile(r"^\s*conntrack\s+(-S|--stats)\b(?!.*\|)"), conntrack_S_table),
)


@dataclass(frozen=True)
class Shown:
    """One command as a notebook shows it.

    Attributes:
        role: where it ran (``node``, ``pod-1``, ``init`` ...).
        result: the :class:`~labkit.host.Result` (command, stdout, stderr, exit code).
        table: the output as a DataFrame where it is a table, else None.
        note: a line shown under the output (why it failed, what it means).
    """

    role: str
    result: Result
    table: pd.DataFrame | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.result.ok

    @property
    def text(self) -> str:
        """What it printed on stdout, stripped."""
        return self.result.stdout.strip()

    def value(self) -> int:
        """The output as one integer (``cat .../nf_conntrack_count``).

        Raises:
            ValueError: the output is not one integer.
        """
        return int(self.text)

    def _repr_html_(self) -> str:
        r = self.result
        out = html.escape(r.stdout.rstrip("\n"))
        err = html.escape(r.stderr.rstrip("\n"))
        parts = [f'<div class="labkit-shell"><pre style="margin:0"><b>[{html.escape(self.role)}]# '
                 f'{html.escape(r.command)}</b>']
        if out:
            parts.append("\n" + out)
        if err:
            parts.append(f'\n<span style="color:#b00">{err}</span>')
        if not r.ok:
            parts.append(f'\n<span style="color:#b00">(exit code {r.exit_code})</span>')
        parts.append("</pre>")
        if self.table is not None and not self.table.empty:
            parts.append(self.table.to_html(border=0))
        if self.note:
            parts.append(f"<p><i>{html.escape(self.note)}</i></p>")
        return "".join(parts) + "</div>"

    def __repr__(self) -> str:
        r = self.result
        lines = [f"[{self.role}]# {r.command}"]
        lines += [x for x in (r.stdout.rstrip("\n"), r.stderr.rstrip("\n")) if x]
        if not r.ok:
            lines.append(f"(exit code {r.exit_code})")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def sh(testbed: Any, role: str, command: str, *, timeout: float = 30.0, note: str = "") -> Shown:
    """Run ``command`` (a shell line, as typed in the article) as ``role`` on ``testbed``.

    Args:
        testbed: a testbed that is up (``testbed.host(role)``).
        role: ``node``, ``pod-N``, ``client`` or ``init``.
        command: run by ``sh -c`` there (pipes allowed: ``conntrack -L expect | tail -1``).
        timeout: seconds before it is ended.
        note: a line shown under the output.

    Returns:
        The :class:`Shown` command; it does not raise for a non-zero exit.

    Raises:
        TestbedError: the testbed is not up or has no such role.
        CommandTimedOut: it ran past ``timeout``.
    """
    host = testbed.host(role)
    result = host.run(command, check=False, timeout=timeout)
    table = None
    for pattern, parse in TABLE_PARSERS:
        if pattern.search(command) and result.ok:
            table = parse(result.stdout)
    return Shown(role, result, table, note)


def sysctl_commands(node_sysctls: dict[str, Any]) -> list[tuple[str, str]]:
    """The article's ``sysctl -w`` lines for an iteration's node values, with where each runs.

    ``nf_conntrack_max`` and ``nf_conntrack_expect_max`` are global: only the
    machine's own namespace (``init``) may write them; the UDP timeouts are the
    node's namespace's own.

    Returns:
        ``[(role, "sysctl -w name=value")]``, globals first.
    """
    from labkit.sysctls import is_global

    items = sorted(node_sysctls.items(), key=lambda kv: (not is_global(kv[0]), kv[0]))
    return [("init" if is_global(name) else "node", f"sysctl -w {name}={value}") for name, value in items]


@dataclass(frozen=True)
class ShownList:
    """Several commands shown one after the other (``sysctl -w`` of an iteration's values)."""

    items: list

    @property
    def ok(self) -> bool:
        """True when every command exited 0."""
        return all(item.ok for item in self.items)

    def _repr_html_(self) -> str:
        return "".join(item._repr_html_() for item in self.items)

    def __repr__(self) -> str:
        return "\n".join(repr(item) for item in self.items)


@dataclass(frozen=True)
class Panel:
    """Titled blocks of text (a manifest excerpt, the kubelet's verdict), shown as in a terminal.

    Attributes:
        blocks: ``[(title, text, refused)]``; a refused block is shown in red.
    """

    blocks: list[tuple[str, str, bool]]

    def _repr_html_(self) -> str:
        parts = []
        for title, text, refused in self.blocks:
            style = ' style="color:#b00"' if refused else ""
            parts.append(f"<p><b>{html.escape(title)}</b></p><pre{style}>{html.escape(text)}</pre>")
        return "".join(parts)

    def __repr__(self) -> str:
        return "\n\n".join(f"{title}\n{text}" for title, text, _ in self.blocks)


def admission(pod: str, sysctls: dict[str, Any], allowed: tuple[str, ...]) -> tuple[str, bool]:
    """The kubelet's verdict on a pod's sysctls: (``admitted ...`` or the ``SysctlForbidden`` message, refused)."""
    from labkit.exceptions import PodRejected
    from labkit.manifests import admit_sysctls

    try:
        admit_sysctls(pod, sysctls, allowed)
    except PodRejected as exc:
        return f"Warning  {exc.reason}  kubelet  {exc}", True
    return f"pod {pod}: admitted ({len(sysctls)} sysctl(s) in its securityContext)", False


def kubelet_admission(iteration: Any, tuned: Any, manifests: Any = None) -> Panel:
    """The Deployment's ``securityContext.sysctls``, the kubelet's allowlist, and the verdicts.

    Args:
        iteration: the :class:`~labkit.scenario.Iteration` shown.
        tuned: an iteration whose pods set the UDP timeouts (the article's iteration 8), for
            the refusal shown when ``iteration`` sets none.
        manifests: a :class:`~labkit.manifests.Manifests` (default: labkit's ``k8s-manifests/``).

    Returns:
        A :class:`Panel`: the manifest excerpt, the kubelet's ``allowedUnsafeSysctls``, its
        verdict for this iteration, and one refusal (``SysctlForbidden``) the kubelet gives
        when the allowlist does not admit the timeouts.
    """
    import yaml

    from labkit.manifests import Manifests

    manifests = manifests or Manifests()
    pod = manifests.deployment_for(iteration)["spec"]["template"]["spec"]
    excerpt = {"spec": {"template": {"spec": {"securityContext": pod.get("securityContext", {})}}}}
    allowed = tuple(iteration.allowed_unsafe_sysctls)
    name = f"{manifests.pod_template_for(iteration).deployment}-pod"
    blocks = [("Deployment (k8s-manifests/), as this iteration sizes it:",
               yaml.safe_dump(excerpt, sort_keys=False).rstrip(), False),
              ("kubelet config (/var/lib/kubelet/config.yaml):",
               yaml.safe_dump({"allowedUnsafeSysctls": list(allowed)}, sort_keys=False).rstrip(), False)]
    if iteration.setup != "nodeport":
        blocks.append(("The kubelet's verdict:", "no pod in this iteration (plain server on the node)", False))
    else:
        blocks.append(("The kubelet's verdict:", *admission(name, dict(iteration.pod_sysctls), allowed)))
    if iteration.pod_sysctls and allowed:
        text, refused = admission(name, dict(iteration.pod_sysctls), ())
        blocks.append(("The same pod on a kubelet without the allowlist:", text, refused))
    else:
        text, refused = admission(name, dict(tuned.pod_sysctls), allowed)
        wanted = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in tuned.pod_sysctls.items())
        blocks.append((f"If this Deployment set the pod's timeouts ({wanted}) with this kubelet:", text, refused))
    return Panel(blocks)
