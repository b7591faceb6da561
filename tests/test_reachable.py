"""monkeytrain.reachable: the one-request probe that the hub's weights (test_weights.py) and W&B
(test_tracking.py) ask before their libraries' own minute of retries, here without a network."""

from __future__ import annotations

import pytest

from monkeytrain.reachable import why_no_answer

URL = "https://server.example"


class ReadTimeout(Exception):
    """Named as requests' and httpx's are: the kind of the error is what the line gives."""


class CertificateRefused(Exception):
    pass


def failing(error: Exception):
    def ask():
        raise error
    return ask


def test_a_server_that_answers_is_no_silence():
    assert why_no_answer(URL, lambda: "404 Not Found", "10 s") is None


def test_a_refused_connection_is_named_by_its_kind():
    assert why_no_answer(URL, failing(ConnectionRefusedError(111, "refused")), "10 s") == (
        f"{URL} did not answer (ConnectionRefusedError)")


def test_a_timeout_names_the_time_it_was_given():
    assert why_no_answer(URL, failing(ReadTimeout()), "HF_HUB_ETAG_TIMEOUT=10 s") == (
        f"{URL} did not answer within HF_HUB_ETAG_TIMEOUT=10 s (ReadTimeout)")


def test_an_error_the_caller_counts_as_an_answer_is_one_and_only_that_error():
    assert why_no_answer(URL, failing(CertificateRefused()), "10 s", answers=(CertificateRefused,)) is None
    assert why_no_answer(URL, failing(CertificateRefused()), "10 s") == f"{URL} did not answer (CertificateRefused)"


def test_an_interrupt_during_the_wait_is_not_taken_for_silence():
    """Only Exceptions mean no answer: a KeyboardInterrupt during the wait still stops the run."""
    with pytest.raises(KeyboardInterrupt):
        why_no_answer(URL, failing(KeyboardInterrupt()), "10 s")
