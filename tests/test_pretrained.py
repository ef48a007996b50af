"""Where a run's `pretrained` weights may come from: the models bucket, a run's own checkpoints (what a
registered model points at), or a local file inside ESSP_PRETRAINED_DIRS; anything else is refused, naming
the param and the places allowed, before the run starts (verify_manifest) and again by the trainer."""

from __future__ import annotations

import pytest

from essp.lifecycle.epochs import verify_manifest
from essp.lifecycle.params import RunParamsError, parse_params
from essp.settings import Settings
from essp.training.artifacts import PretrainedRefused, check_pretrained


@pytest.fixture
def local(tmp_path) -> Settings:
    (tmp_path / "weights").mkdir()
    return Settings(state_dir=tmp_path / "state", pretrained_dirs=str(tmp_path / "weights"))


def test_weights_from_the_models_bucket_or_a_runs_checkpoints_are_accepted(local):
    for uri in (f"s3://{local.bucket_models}/resnet18-imagenet.pt", f"s3://{local.bucket_models}/a/b/c.pt",
                f"s3://{local.bucket_runs}/run-1/checkpoints/rgb/epoch-0003.pt"):
        assert check_pretrained(uri, local) == uri


@pytest.mark.parametrize("source, why", [
    ("s3://someone-elses-bucket/w.pt", "only from the models bucket"),
    ("s3://{runs}/run-1/spec.json", "only from the models bucket"),
    ("s3://{runs}/run-1/checkpoints/rgb/../../other/x.pt", r"'\.\.' segments"),
    ("s3://{models}", "must name a bucket and a key"),
    ("https://example.com/w.pt", "neither an s3:// URI nor a local file"),
    ("file:///etc/passwd", "neither an s3:// URI nor a local file"),
    ("/etc/passwd", "must be inside"),
    ("{weights}/../escape.pt", "must be inside"),
])
def test_anything_else_is_refused_saying_why(local, tmp_path, source, why):
    source = source.format(runs=local.bucket_runs, models=local.bucket_models, weights=tmp_path / "weights")
    with pytest.raises(PretrainedRefused, match=why):
        check_pretrained(source, local)


def test_a_local_file_must_really_be_inside_the_allowed_folder(local, tmp_path):
    inside = tmp_path / "weights" / "w.pt"
    inside.write_bytes(b"x")
    assert check_pretrained(str(inside), local) == str(inside)
    (tmp_path / "secret.pt").write_bytes(b"x")
    link = tmp_path / "weights" / "link.pt"
    link.symlink_to(tmp_path / "secret.pt")  # inside by name, outside in fact
    with pytest.raises(PretrainedRefused, match="must be inside"):
        check_pretrained(str(link), local)
    default = Settings(state_dir=tmp_path / "state")  # unset: <state_dir>/pretrained
    with pytest.raises(PretrainedRefused, match=str(tmp_path / "state" / "pretrained")):
        check_pretrained(str(inside), default)


def test_a_run_with_refused_weights_stops_at_verify_manifest_naming_the_param(settings):
    spec = parse_params({"dataset": "no-such-dataset", "pretrained": {"rgb": "s3://elsewhere/w.pt"}})
    with pytest.raises(RunParamsError, match=r"pretrained\.rgb: pretrained s3://elsewhere/w\.pt: weights load only"):
        verify_manifest(settings, spec)
