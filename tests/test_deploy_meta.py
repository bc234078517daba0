"""DeployMeta: what an exported model carries survives JSON, and bad metadata says what to do."""
import json

import pytest
import torch

from okdpose.deploy_meta import META_VERSION, DeployMeta, MetaError
from okdpose.model import MultiOutHRNet
from okdpose.params import Params


def test_round_trip_and_the_model_defines_width_and_stages():
    p = Params().validate()
    with torch.device("meta"):
        model = MultiOutHRNet(12, 6, 3)
    meta = DeployMeta.for_model(p, model, stage=2, test_ap=0.4, source={"commit": "abc"})
    assert (meta.width, meta.n_stage_trained, meta.stage) == (6, 3, 2)
    assert meta.image_size == tuple(p.data.image_size) and meta.joint_names == tuple(p.joint_spec.names)
    assert DeployMeta.from_json(meta.to_json()) == meta
    assert meta.joint_spec() == p.joint_spec


def test_bad_metadata_is_named():
    p = Params().validate()
    raw = json.loads(DeployMeta.from_params(p, stage=4).to_json())
    with pytest.raises(MetaError, match="re-export"):
        DeployMeta.from_json(json.dumps({**raw, "version": META_VERSION + 1}), "x.onnx")
    with pytest.raises(MetaError, match=r"x.onnx: missing fields \['image_size'\]"):
        DeployMeta.from_json(json.dumps({k: v for k, v in raw.items() if k != "image_size"}), "x.onnx")
    with pytest.raises(MetaError, match="not JSON"):
        DeployMeta.from_json("{", "x.onnx")
    with pytest.raises(MetaError, match="differ from okdpose's 'babypose12'"):
        DeployMeta.from_json(json.dumps({**raw, "joint_names": raw["joint_names"][::-1]})).joint_spec()
    with pytest.raises(MetaError, match="predicts 17 joints"):
        DeployMeta.for_model(p, MultiOutHRNet(17, 4, 2), stage=2)


def test_precision_is_recorded_only_when_not_fp32():
    from dataclasses import replace

    p = Params().validate()
    meta = DeployMeta.from_params(p, stage=3)
    assert meta.precision == "fp32" and "precision" not in json.loads(meta.to_json())   # fp32 files as before
    for prec in ("fp16", "bf16"):
        low = replace(meta, precision=prec)
        assert json.loads(low.to_json())["precision"] == prec and DeployMeta.from_json(low.to_json()) == low
    raw = json.loads(meta.to_json())
    with pytest.raises(MetaError, match=r"x.pt: precision 'int8', this code knows \['fp32', 'fp16', 'bf16'\]"):
        DeployMeta.from_json(json.dumps({**raw, "precision": "int8"}), "x.pt")
