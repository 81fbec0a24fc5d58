"""The operator page: what the bot is doing, on one server-rendered page (no scripts, no build step).

``GET /`` shows the active policy, policy versions with their gate results (success, paired difference and its
95 % interval), improvement runs with their outcome and timings, a learning curve (success per version and real
users' mean reward per day, as inline SVG), and recent conversations with their reward and 👍/👎. It is read-only
for everyone; ``POST /actions`` (roll back, activate a version) needs ``ADMIN_TOKEN``, typed into the page's form,
compared in constant time, and is refused (403) without it or when no token is configured. The page works on a
phone: one column, tables scroll sideways.

An action changes the database and the policy this process serves; other replicas follow the database's active
version as they follow a promotion (the improvement loop's ``sync_active``; checkpoints must be on a shared disk).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from bot import redaction
from bot.web.metrics import StepTimer
from storage import PolicyStatus, PolicyVersion, TrainingRun

if TYPE_CHECKING:
    from bot.server import Runtime

logger = logging.getLogger(__name__)

#: Who the page's actions are logged and recorded as.
OPERATOR = "operator-page"

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:.75rem;color:#222}
h1{font-size:1.3rem;margin:.2rem 0}h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{border-bottom:1px solid #ddd;padding:.3rem .4rem;text-align:left;white-space:nowrap}
.ok{color:#17692c}.bad{color:#a11}.muted{color:#777}
form.actions{background:#f4f4f4;padding:.6rem;border-radius:.4rem}
input,button{font-size:1rem;padding:.45rem .6rem;margin:.2rem 0;min-height:2.4rem}
svg{width:100%;height:auto;max-width:36rem;background:#fafafa;border:1px solid #ddd;border-radius:.3rem}
.charts{display:flex;flex-wrap:wrap;gap:.8rem}.charts figure{margin:0;flex:1 1 18rem}
.notice{padding:.6rem;border-radius:.4rem;background:#eef6ee}.notice.bad{background:#fbeaea}
"""


def page_routes(runtime: Runtime) -> list[BaseRoute]:
    """``GET /`` (the page) and ``POST /actions`` (token-guarded rollback and activation)."""

    async def page(request: Request) -> Response:
        return HTMLResponse(await render_page(runtime))

    async def actions(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        action = (form.get("action") or [""])[0]
        if not token_accepted(runtime, token):
            logger.warning("operator page: action %r refused (no or wrong admin token)", action[:40])
            message = (
                "Refused: this page is read-only (ADMIN_TOKEN is not set)."
                if runtime.settings.admin_token is None
                else "Refused: wrong admin token."
            )
            return HTMLResponse(await render_page(runtime, notice=message, failed=True), status_code=403)
        try:
            message = await perform(runtime, action)
            failed = False
        except Exception as error:
            logger.exception("operator page: action %r failed", action[:40])
            message, failed = redaction.redact(f"{action} failed: {type(error).__name__}: {error}"), True
        return HTMLResponse(await render_page(runtime, notice=message, failed=failed))

    return [Route("/", page, methods=["GET"]), Route("/actions", actions, methods=["POST"])]


def token_accepted(runtime: Runtime, token: str) -> bool:
    """Whether ``token`` is the configured admin token (never when none is configured)."""
    expected = runtime.settings.admin_token
    if expected is None or not token:
        return False
    return hmac.compare_digest(token.encode(), expected.get_secret_value().encode())


async def perform(runtime: Runtime, action: str) -> str:
    """Carry out ``rollback`` or ``activate:<version id>``; returns what happened, for the operator."""
    if action == "rollback":
        if runtime.service.improver is None:
            return "The improvement loop is not running in this process, so there is nothing to roll back."
        result = await runtime.service.improver.rollback(requested_by=OPERATOR)
        logger.info("operator page: rollback: %s", result)
        return result
    name, _, argument = action.partition(":")
    if name == "activate" and argument.isdigit():
        return await activate(runtime, int(argument))
    return f"Unknown action {action[:40]!r}."


async def activate(runtime: Runtime, version_id: int) -> str:
    """Serve policy version ``version_id``: load it first (a bad checkpoint changes nothing), then record it as
    the active version and swap it in."""
    version = await runtime.store.get_policy_version(version_id)
    if version is None:
        return f"There is no policy version {version_id}."
    if version.status == PolicyStatus.ACTIVE and runtime.policies.version_id == version_id:
        return f"Version {version_id} is serving already."
    if not Path(version.path).is_dir():
        return f"Version {version_id} cannot be activated: its checkpoint is gone."
    policy = await asyncio.to_thread(runtime.load_policy, version.path, version.id)
    try:
        await runtime.store.activate_policy_version(version_id)
    except BaseException:
        policy.close()
        raise
    runtime.policies.swap(policy)
    logger.info("operator page: version %s activated", version_id)
    return f"Version {version_id} is active now."


# --- rendering --------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value))


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f} %" if isinstance(value, int | float) else "–"


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "–"


def _gate(metrics: dict[str, Any]) -> str:
    if "paired_difference" not in metrics:
        return "–"
    text = f"{100 * float(metrics['paired_difference']):+.1f} pts"
    if "paired_ci_low" in metrics and "paired_ci_high" in metrics:
        text += f" [{100 * float(metrics['paired_ci_low']):+.1f}, {100 * float(metrics['paired_ci_high']):+.1f}]"
    return text


def line_chart(points: Sequence[tuple[str, float]], *, title: str, y_min: float = 0.0, y_max: float = 1.0) -> str:
    """An inline SVG line chart of ``(label, value)`` points (values clipped to ``y_min .. y_max``)."""
    width, height, left, right, top, bottom = 360, 180, 38, 10, 22, 34
    inner_w, inner_h = width - left - right, height - top - bottom
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" class="chart">',
        f'<text x="{left}" y="15" font-size="12">{_e(title)}</text>',
        f'<line x1="{left}" y1="{top + inner_h}" x2="{left + inner_w}" y2="{top + inner_h}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + inner_h}" stroke="#999"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = top + inner_h * (1 - fraction)
        value = y_min + fraction * (y_max - y_min)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{value:g}</text>')
    if not points:
        parts.append(f'<text x="{left + 10}" y="{top + inner_h / 2}" font-size="12" fill="#777">no data yet</text>')
    else:
        step = inner_w / max(1, len(points) - 1)
        coordinates = []
        for index, (label, value) in enumerate(points):
            clipped = min(max(value, y_min), y_max)
            x = left + (step * index if len(points) > 1 else inner_w / 2)
            y = top + inner_h * (1 - (clipped - y_min) / ((y_max - y_min) or 1))
            coordinates.append((x, y))
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#1f5fbf">'
                f"<title>{_e(label)}: {value:.3f}</title></circle>"
            )
            if len(points) <= 8 or index in (0, len(points) - 1):
                parts.append(
                    f'<text x="{x:.1f}" y="{height - 18}" font-size="10" text-anchor="middle">{_e(label)}</text>'
                )
        if len(coordinates) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
            parts.append(f'<polyline points="{path}" fill="none" stroke="#1f5fbf" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _versions_table(versions: Sequence[PolicyVersion], serving: int | None) -> str:
    rows = []
    for version in versions:
        metrics = version.metrics or {}
        status = _e(version.status) + (" (serving here)" if version.id == serving else "")
        button = ""
        if version.id != serving and version.status != PolicyStatus.ACTIVE:
            button = f'<button name="action" value="activate:{version.id}">Activate v{version.id}</button>'
        rows.append(
            f"<tr><td>v{version.id}</td><td>{status}</td><td>{_pct(metrics.get('success_rate'))}</td>"
            f"<td>{_pct(metrics.get('active_success_rate'))}</td><td>{_gate(metrics)}</td>"
            f"<td>{_e(version.algorithm)}</td><td>{_when(version.created_at)}</td>"
            f"<td>{_when(version.activated_at)}</td><td>{button}</td></tr>"
        )
    head = (
        "<tr><th>Version</th><th>Status</th><th>Success</th><th>Active then</th><th>Gate: paired diff [95 % CI]</th>"
        "<th>Algorithm</th><th>Created</th><th>Activated</th><th></th></tr>"
    )
    body = "".join(rows) or '<tr><td colspan="9" class="muted">No trained versions yet.</td></tr>'
    return f'<div class="scroll"><table id="versions">{head}{body}</table></div>'


def _timings(run: TrainingRun, steps: StepTimer | None) -> str:
    """Step timings of a run timed by this process, else the durations its record keeps (``*_s`` metrics)."""
    timed = steps.for_run(run.started_at) if steps is not None else None
    if timed is not None:
        return ", ".join(
            f"{name} {'…' if seconds is None else f'{seconds:.0f} s'}"
            for name, seconds in timed.durations(run.finished_at)
        )
    return ", ".join(
        f"{key.removesuffix('_s')} {float(value):.0f} s"
        for key, value in (run.metrics or {}).items()
        if key.endswith("_s") and isinstance(value, int | float)
    )


def _runs_table(runs: Sequence[TrainingRun], steps: StepTimer | None = None) -> str:
    rows = []
    for run in runs:
        metrics = run.metrics or {}
        timings = _timings(run, steps)
        outcome_class = {"succeeded": "ok", "failed": "bad"}.get(run.status, "")
        detail = metrics.get("decision") or run.error or ""
        rows.append(
            f"<tr><td>#{run.id}</td><td class='{outcome_class}'>{_e(run.status)}</td><td>{_e(run.trigger)}</td>"
            f"<td>{_when(run.started_at)}</td><td>{_e(timings or '–')}</td><td>{_gate(metrics)}</td>"
            f"<td>{run.n_imagined} / {run.n_real}</td><td>{_e(redaction.redact(str(detail))[:160])}</td></tr>"
        )
    head = (
        "<tr><th>Run</th><th>Outcome</th><th>Trigger</th><th>Started</th><th>Timings</th><th>Gate</th>"
        "<th>Imagined / real</th><th>Decision or error</th></tr>"
    )
    body = "".join(rows) or '<tr><td colspan="8" class="muted">No improvement runs yet.</td></tr>'
    return f'<div class="scroll"><table id="runs">{head}{body}</table></div>'


async def render_page(runtime: Runtime, *, notice: str | None = None, failed: bool = False) -> str:
    """The whole page as HTML (``notice``: the outcome of an action, shown on top)."""
    store = runtime.store
    versions = await store.list_policy_versions(limit=30)
    runs = await store.list_training_runs(limit=15)
    conversations = await store.recent_conversations(limit=20)
    rewards = await store.daily_rewards(days=30)
    serving = runtime.policies.version_id
    curve = [
        (f"v{version.id}", float(version.metrics["success_rate"]))
        for version in sorted(versions, key=lambda v: v.id or 0)
        if isinstance((version.metrics or {}).get("success_rate"), int | float)
    ]
    reward_points = [(day[5:], mean) for day, mean, _ in rewards]
    low = min([0.0, *(value for _, value in reward_points)])
    conversation_rows = (
        "".join(
            f"<tr><td>#{s.conversation.id}</td><td>{_e(s.conversation.platform)}</td><td>{_when(s.conversation.started_at)}"
            f"</td><td>{_e(s.conversation.status)}</td><td>{s.turns}</td>"
            f"<td>{'–' if s.conversation.reward is None else f'{s.conversation.reward:+.2f}'}</td>"
            f"<td>{s.thumbs_up} 👍 / {s.thumbs_down} 👎</td></tr>"
            for s in conversations
        )
        or '<tr><td colspan="7" class="muted">No conversations yet.</td></tr>'
    )
    admin = runtime.settings.admin_token is not None
    notice_html = f'<p class="notice{" bad" if failed else ""}" id="notice">{_e(notice)}</p>' if notice else ""
    token_field = (
        '<label>Admin token <input type="password" name="token" autocomplete="current-password"></label>'
        if admin
        else '<p class="muted">Read-only: set ADMIN_TOKEN to enable these buttons.</p>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Reverie — operator</title><style>{_STYLE}</style></head>
<body>
<h1>Reverie — operator</h1>
<p>Task <b>{_e(runtime.task.name)}</b> · serving <b id="serving">{_e(runtime.policies.name)}</b>
{f"(version {serving})" if serving is not None else "(the prompted base model)"} ·
<a href="/metrics">metrics</a> · <a href="/readyz">readiness</a></p>
{notice_html}
<h2>Learning curve</h2>
<div class="charts">
<figure>{line_chart(curve, title="Success on simulated users, per version")}</figure>
<figure>{line_chart(reward_points, title="Users' mean reward per day", y_min=low, y_max=1.0)}</figure>
</div>
<form class="actions" method="post" action="/actions">
<h2>Policy versions</h2>
{_versions_table(versions, serving)}
<p>{token_field}</p>
<button name="action" value="rollback" id="rollback">Roll back to the previous version</button>
</form>
<h2>Improvement runs</h2>
{_runs_table(runs, runtime.metrics.steps if runtime.metrics is not None else None)}
<h2>Recent conversations</h2>
<div class="scroll"><table id="conversations"><tr><th>Conversation</th><th>Platform</th><th>Started</th>
<th>Status</th><th>Turns</th><th>Reward</th><th>Feedback</th></tr>{conversation_rows}</table></div>
</body></html>"""
