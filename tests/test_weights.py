"""monkeytrain.weights: pretrained weights from a local file (.safetensors, torch.save) or the Hugging Face hub,
fitted to the model built."""

from __future__ import annotations

import argparse
import http.server
import socket
import threading
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file

from monkeytrain.errors import UserError
from monkeytrain.model import create_model
from monkeytrain.weights import load_weights_file, strip_wrapper_prefixes

# timm's tiny test networks keep these tests fast; resnet18 only where it matters.
TINY = "test_resnet"


def save_weights(model: torch.nn.Module, path, prefix: str = ""):
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def states_equal(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_local_weights_with_the_same_class_count_load_completely(tmp_path):
    torch.manual_seed(1)
    source = create_model(TINY, 4)
    path = save_weights(source, tmp_path / "w.safetensors")
    torch.manual_seed(2)
    loaded = create_model(TINY, 4, pretrained=str(path))
    expected = source.state_dict()
    assert states_equal(loaded.state_dict(), expected, expected.keys())


def test_local_weights_with_another_class_count_replace_the_head_and_keep_the_body(tmp_path):
    torch.manual_seed(1)
    source = create_model(TINY, 10)
    path = save_weights(source, tmp_path / "w.safetensors")
    torch.manual_seed(2)
    fresh = create_model(TINY, 3).state_dict()
    torch.manual_seed(2)
    loaded = create_model(TINY, 3, pretrained=str(path)).state_dict()
    body = [k for k in loaded if not k.startswith("fc.")]
    assert len(body) > 10
    assert states_equal(loaded, source.state_dict(), body)
    assert loaded["fc.weight"].shape == (3, source.state_dict()["fc.weight"].shape[1])
    # the new head is the freshly initialised one, not something derived from the old head
    assert torch.equal(loaded["fc.weight"], fresh["fc.weight"])
    first_conv = next(k for k in body if loaded[k].ndim == 4)
    assert not torch.equal(loaded[first_conv], fresh[first_conv])  # the body is not the fresh one


def test_head_replacement_works_for_a_head_not_named_fc(tmp_path):
    torch.manual_seed(1)
    source = create_model("test_efficientnet", 10)
    path = save_weights(source, tmp_path / "w.safetensors")
    loaded = create_model("test_efficientnet", 2, pretrained=str(path)).state_dict()
    assert loaded["classifier.weight"].shape[0] == 2
    body = [k for k in loaded if not k.startswith("classifier.")]
    assert states_equal(loaded, source.state_dict(), body)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_in_the_file_are_stripped(tmp_path, prefix):
    torch.manual_seed(1)
    source = create_model(TINY, 4)
    path = save_weights(source, tmp_path / "w.safetensors", prefix=prefix)
    loaded = create_model(TINY, 4, pretrained=str(path)).state_dict()
    assert states_equal(loaded, source.state_dict(), loaded.keys())


def test_strip_wrapper_prefixes_in_either_nesting_order():
    # torch.compile over DDP (what Accelerate builds with a dynamo backend) gives "_orig_mod.module."
    tensor = torch.zeros(1)
    state = {"module.a": tensor, "_orig_mod.b": tensor, "module._orig_mod.c": tensor,
             "_orig_mod.module.d": tensor, "e.module.f": tensor}
    assert set(strip_wrapper_prefixes(state)) == {"a", "b", "c", "d", "e.module.f"}


@pytest.mark.parametrize("other", ["test_efficientnet", "resnet10t"])
def test_weights_of_another_architecture_are_a_user_error(tmp_path, other):
    path = save_weights(create_model(other, 3), tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="--model"):
        create_model(TINY, 3, pretrained=str(path))


def test_weights_of_same_names_but_other_shapes_are_a_user_error(tmp_path):
    # test_resnet and resnet18 share most key names (conv1..., layer1...) but not their shapes:
    # nothing may be half-loaded.
    path = save_weights(create_model("resnet18", 3), tmp_path / "r18.safetensors")
    with pytest.raises(UserError):
        create_model(TINY, 3, pretrained=str(path))


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        create_model(TINY, 3, pretrained=str(tmp_path / "absent.safetensors"))


def test_a_file_of_neither_kind_is_a_user_error_naming_both(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"weights.bin is neither a readable .safetensors file \(.*\) nor a "
                                        r"torch.save file; "):
        load_weights_file(create_model(TINY, 3), path)


def equal_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor], but: str = "") -> bool:
    return all(torch.equal(value, expected[key]) for key, value in model.state_dict().items()
               if not (but and key.startswith(but)))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_plain_torch_save_state_dict_loads(tmp_path, zipped):
    source = create_model(TINY, 4).state_dict()
    torch.save(source, tmp_path / "w.pth", _use_new_zipfile_serialization=zipped)
    assert equal_weights(create_model(TINY, 4, pretrained=str(tmp_path / "w.pth")), source)


def test_a_timm_train_checkpoint_loads_its_ema_weights_and_gets_a_new_head(tmp_path):
    """As timm's train.py writes model_best.pth.tar: its flags (an argparse Namespace) beside the weights,
    the EMA's too, which timm's --initial-checkpoint takes."""
    weights, ema = create_model(TINY, 10).state_dict(), create_model(TINY, 10).state_dict()
    torch.save({"epoch": 3, "arch": TINY, "state_dict": weights, "state_dict_ema": {f"module.{k}": v for k, v in
                                                                                   ema.items()},
                "optimizer": torch.optim.SGD(create_model(TINY, 10).parameters(), lr=0.1).state_dict(),
                "args": argparse.Namespace(model=TINY, lr=0.1, sched="cosine"), "version": 2, "metric": 71.5},
               tmp_path / "model_best.pth.tar")
    loaded = create_model(TINY, 3, pretrained=str(tmp_path / "model_best.pth.tar"))
    assert equal_weights(loaded, ema, but=loaded.pretrained_cfg["classifier"])
    assert loaded.get_classifier().out_features == 3


def test_a_pickled_whole_model_is_refused_in_one_line_without_unpickling_it(tmp_path):
    torch.save(create_model(TINY, 3), tmp_path / "model.pt")
    with pytest.raises(UserError, match=r"model.pt is a torch.save file that could not be read as weights \(.*\); "
                                        r"save the model's state_dict\(\)"):
        create_model(TINY, 3, pretrained=str(tmp_path / "model.pt"))


def test_a_torch_save_file_without_a_state_dict_is_refused_in_one_line(tmp_path):
    torch.save({"epoch": 3, "metric": 71.5}, tmp_path / "info.pth")
    with pytest.raises(UserError, match="info.pth holds no state dict of weights"):
        create_model(TINY, 3, pretrained=str(tmp_path / "info.pth"))


def test_hub_weights_with_hf_hub_offline_are_a_user_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads these variables once at import, which has already happened here
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match="resnet18"):  # the tests below check it costs no retry waits
        create_model("resnet18", 3, pretrained="hub")


def test_hub_weights_offline_are_one_line_without_the_hubs_own_warnings(monkeypatch):
    import logging

    request_log, warned = logging.getLogger("huggingface_hub.utils._http"), []

    def offline_hub(*args, **kwargs):  # as huggingface_hub reports a request that fails, then raises
        warned.append(request_log.isEnabledFor(logging.WARNING))  # would print above our line
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline_hub)
    with pytest.raises(UserError, match="could not fetch pretrained weights for 'resnet18'"):
        create_model("resnet18", 3, pretrained="hub")
    assert warned == [False]
    assert logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING)  # as it was


class NotFoundHub:
    """A stand-in for the hub on a local port that answers every request 404, counting them."""

    def __init__(self):
        self.requests = 0
        hub = self

        class NotFound(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.requests += 1
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

            def log_message(self, *args):  # not on the test's stderr
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def refusing_url() -> str:
    """A local port nothing listens on: connections are refused at once, as a node with no route out fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def hub_at(tmp_path, monkeypatch):
    """`hub_at(url)`: huggingface_hub sent to `url` (what HF_ENDPOINT does, read at its import, which has
    already happened here), HF_HUB_OFFLINE unset, with an empty cache of its own in tmp_path. Returns the
    waits of its retries' backoff, recorded rather than waited."""
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.utils._http as hub_http

    def at(url: str) -> list[float]:
        monkeypatch.setattr(hub_constants, "ENDPOINT", url)
        template = url + "/{repo_id}/resolve/{revision}/{filename}"  # the files' URLs, from HF_ENDPOINT too
        monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        waits: list[float] = []
        monkeypatch.setattr(hub_http, "time", SimpleNamespace(sleep=waits.append))  # its only use of `time`
        return waits

    return at


def test_hub_weights_with_a_hub_that_does_not_answer_fail_at_once_without_retries(hub_at):
    """A compute node without internet, HF_HUB_OFFLINE unset: was about a minute of huggingface_hub's retries
    (each file asked 6 times, 1+2+4+8+8 s apart) before the one line."""
    url = refusing_url()
    waits = hub_at(url)
    with pytest.raises(UserError) as raised:
        create_model(TINY, 3, pretrained="hub")
    assert waits == []
    assert str(raised.value) == (
        f"could not fetch pretrained weights for '{TINY}': the Hugging Face hub at {url} did not answer "
        "(ConnectError), and they are not in its local cache; check the network (or its proxy: HTTPS_PROXY), "
        "or pass --pretrained PATH.safetensors.")


def test_hub_weights_in_its_cache_load_where_the_hub_does_not_answer(hub_at, tmp_path):
    """Offline as with HF_HUB_OFFLINE=1: what huggingface_hub cached on an earlier run still loads."""
    hub_at(refusing_url())
    torch.manual_seed(3)
    cached = create_model(TINY, 3)
    repo = tmp_path / "hf" / "hub" / f"models--timm--{cached.pretrained_cfg['hf_hub_id'].split('/')[1]}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_weights(cached, repo / "snapshots" / commit / "model.safetensors")
    loaded = create_model(TINY, 3, pretrained="hub").state_dict()
    body = [key for key in loaded if not key.startswith("fc.")]  # timm resets the head of another class count
    assert states_equal(loaded, cached.state_dict(), body)


def test_a_hub_that_answers_is_asked_for_the_weights(hub_at):
    """Any answer, an error status too, means a network that works, however slow: not taken as offline."""
    hub = NotFoundHub()
    try:
        hub_at(hub.url)
        with pytest.raises(UserError, match=f"could not fetch pretrained weights for '{TINY}' from the Hugging"):
            create_model(TINY, 3, pretrained="hub")
    finally:
        hub.close()
    assert hub.requests > 1  # the first request, then huggingface_hub's own for the weights


def test_a_monkeytrain_checkpoint_of_another_model_says_which_model_to_give(tmp_path):
    from monkeytrain.checkpoint import CheckpointInfo, save_checkpoint

    info = CheckpointInfo(architecture=TINY, class_names=["a", "b"], class_folders=["a", "b"], mean=[0.5] * 3,
                          std=[0.25] * 3, image_size=32, epoch=1, val_accuracy=0.5, config={})
    path = save_checkpoint(tmp_path, create_model(TINY, 2), info)
    with pytest.raises(UserError, match=rf"{path} is a monkeytrain checkpoint of {TINY}, which does not fit --model "
                                        rf"resnet10t \(no matching '.*'\); give --model {TINY} to train from it\.$"):
        create_model("resnet10t", 3, pretrained=str(path))
