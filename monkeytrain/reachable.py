"""Whether a server answers: one HEAD request, asked before a library's own requests would retry for a minute
or more (huggingface_hub for the hub's weights, wandb.init for W&B) on a node without internet."""

from __future__ import annotations

from typing import Callable, Optional


def why_no_answer(url: str, ask: Callable[[], object], timeout_named: str,
                  answers: tuple[type[BaseException], ...] = ()) -> Optional[str]:
    """Why `url` gave no answer to `ask()` (one HEAD request, through the caller's library, so its proxy):
    '{url} did not answer (ConnectError)', 'did not answer within {timeout_named} (ReadTimeout)' when it
    timed out; None when it answered. Any answer, an error status too, is one, and so is an error in `answers`
    (a certificate the probe's library refuses, say, where the caller's own requests would take it)."""
    try:
        ask()
    except answers:
        return None
    except Exception as error:  # no name, no route, refused, timed out, a proxy's refusal
        kind = error.__class__.__name__
        within = f" within {timeout_named}" if "Timeout" in kind else ""
        return f"{url} did not answer{within} ({kind})"
    return None
