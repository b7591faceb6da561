"""`accelerate launch ...` for slurm/launch_node.sh, without the lines in which torch's elastic agent
reports a stop signal that launch_node.sh has already passed on to the training processes.

Slurm signals every process of a job (scancel, a time limit, systemd a whole service too), so the
launcher of several processes gets the SIGTERM as well, and its elastic agent logs it above the run's
own stop line: "Received 15 death signal, shutting down workers", then "Sending process N closing
signal SIGTERM" once per rank. Those lines go, after a SIGTERM or SIGINT only (the signals launch_node.sh
forwards); every other line of the agent stays: another signal (a SIGHUP, which kills the ranks unsaved),
"Unable to shutdown process N via SIGTERM, forcefully exiting via SIGKILL" (a rank that did not stop in
time), and a rank's failure with the report that names it. LOGLEVEL cannot do this: it sets the level of
the agent's logger alone, not of the one that logs the closing signals, and both log real failures too.
"""

from __future__ import annotations

import logging
import signal
import sys

from accelerate.commands.accelerate_cli import main

FORWARDED = (signal.SIGTERM, signal.SIGINT)


class ForwardedStopSignal(logging.Filter):
    """Drops the agent's report of a forwarded stop signal, and the closing signals it then sends."""

    heard = False  # the agent got a forwarded stop signal: its shutdown follows

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message.startswith("Received %s death signal") and record.args and record.args[0] in FORWARDED:
            ForwardedStopSignal.heard = True
            return False
        return not (ForwardedStopSignal.heard and message.startswith("Sending process %s closing signal"))


def elastic_loggers() -> list[logging.Logger]:
    """The agent's two loggers; none should a torch release move them (the lines then stay, the launch goes on)."""
    try:
        import torch.distributed.elastic.agent.server.api as elastic_agent
        import torch.distributed.elastic.multiprocessing.api as elastic_processes
        return [elastic_agent.logger, elastic_processes.logger]
    except (ImportError, AttributeError):
        return []


if __name__ == "__main__":
    for logger in elastic_loggers():
        logger.addFilter(ForwardedStopSignal())
    sys.argv[0] = "accelerate"
    sys.exit(main())
