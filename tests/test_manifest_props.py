"""Property tests (hypothesis): any manifest.json either opens as a valid workspace or is
refused with WorkspaceError; any --set item either applies or raises UsageError."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gstalk.config import FineConfig, parse_assignments
from gstalk.errors import UsageError, WorkspaceError
from gstalk.workspace import REQUIRES, Workspace

scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=6)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)
stage_names = st.sampled_from(sorted(REQUIRES) + ["extract", "junk"])
records = st.dictionaries(st.sampled_from(["status", "run_id", "config", "summary", "inputs", "outputs"]),
                          json_values | st.sampled_from(["done", "running"]), max_size=6)
manifests = json_values | st.fixed_dictionaries(
    {"schema_version": st.integers(-1, 3) | st.booleans() | st.text(max_size=2)},
    optional={"stages": st.dictionaries(stage_names, records | json_values, max_size=4) | json_values,
              "preset": json_values, "seed": json_values})


@settings(max_examples=300, deadline=None)
@given(doc=manifests)
def test_any_manifest_opens_or_is_refused_cleanly(tmp_path_factory, doc):
    root = tmp_path_factory.mktemp("ws")
    (root / "manifest.json").write_text(json.dumps(doc))
    try:
        ws = Workspace.open(root)
    except WorkspaceError:
        return
    # an opened workspace answers every question without crashing
    assert isinstance(ws.preset, str) and isinstance(ws.seed, int)
    for name in REQUIRES:
        rec = ws.stage(name)
        assert isinstance(rec.status, str) and isinstance(rec.config, dict) and isinstance(rec.summary, dict)
        try:
            ws.require(name)
        except WorkspaceError:
            pass


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["iterations", "dynamic", "mask_lambda", "head", "av_offset", "nope", ""])
       | st.text(max_size=10), value=st.text(max_size=10))
def test_any_set_item_applies_or_raises_usage_error(key, value):
    try:
        cfg = parse_assignments(FineConfig(), [f"{key}={value}"])
    except UsageError:
        return
    field = key.strip().replace("-", "_")
    got, default = getattr(cfg, field), getattr(FineConfig(), field)
    assert got is None or type(got) is type(default) or default is None
