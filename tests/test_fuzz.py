"""Property tests: any valid removal set, group map or settings file works exactly; any invalid one is a clear error."""

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foldgpt.core.settings import flat_settings, options
from foldgpt.errors import FoldGPTError
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.surgery.sharing import fold, parameter_report, parse_groups
from foldgpt.workflows.compress import CompressConfig, compress_config
from tiny import DEPTH, tiny_model

BASE = tiny_model("llama")
BLOCK_PARAMETERS = count_parameters(BASE.model.layers[0])
LINEAR_PARAMETERS = sum(p.numel() for name, p in BASE.model.layers[0].named_parameters() if "proj" in name)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.integers(min_value=-2, max_value=DEPTH + 1), max_size=DEPTH + 1))
def test_any_removal_set_gives_the_right_depth_and_size_or_a_clear_error(removed):
    model = copy.deepcopy(BASE)
    valid = len(set(removed)) == len(removed) and all(0 <= i < DEPTH for i in removed) and len(removed) < DEPTH
    if not valid:
        with pytest.raises(FoldGPTError):
            remove_blocks(model, removed)
        return
    remove_blocks(model, removed)
    assert model.config.num_hidden_layers == len(model.model.layers) == DEPTH - len(removed)
    assert count_parameters(model) == count_parameters(BASE) - len(removed) * BLOCK_PARAMETERS
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(DEPTH - len(removed)))


@st.composite
def group_specs(draw):
    """Group strings: mostly valid partitions of 0..DEPTH-1, sometimes with a gap, an overlap or garbage."""
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=DEPTH - 1))))
    bounds = [0, *cuts, DEPTH]
    parts = [f"{a}-{b - 1}" if b - 1 > a else str(a) for a, b in zip(bounds, bounds[1:])]
    damage = draw(st.sampled_from(["none", "none", "drop", "overlap", "garbage", "reverse"]))
    if damage == "drop" and len(parts) > 1:
        parts.pop(draw(st.integers(min_value=0, max_value=len(parts) - 1)))
    elif damage == "overlap":
        parts.append("0")
    elif damage == "garbage":
        parts.append(draw(st.text(max_size=4)))
    elif damage == "reverse" and len(parts) > 1:
        parts.reverse()
    return ",".join(parts)


@FUZZ
@given(group_specs())
def test_any_group_map_folds_to_the_expected_unique_size_or_is_refused(spec):
    try:
        groups = parse_groups(spec, DEPTH)
    except FoldGPTError:
        return
    model = copy.deepcopy(BASE)
    fold(model, groups, [group[0] for group in groups])
    report = parameter_report(model)
    children = DEPTH - len(groups)
    assert report.materialised == count_parameters(BASE)
    assert report.unique == count_parameters(BASE) - children * LINEAR_PARAMETERS
    assert len(model.model.layers) == DEPTH


SETTING_NAMES = sorted(option.name for option in options(CompressConfig))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=8),
                   st.lists(st.integers(0, 3), max_size=3))


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(SETTING_NAMES), st.text(max_size=6)), VALUES, max_size=5))
def test_any_settings_mapping_is_accepted_converted_or_refused_with_a_clear_error(mapping):
    try:
        config = compress_config(mapping, "config 'fuzz.yaml'")
    except FoldGPTError as error:
        assert "fuzz.yaml" in str(error) and "\n" not in str(error)
        return
    checked = {name: value for name, value in flat_settings(config).items() if name in mapping}
    assert set(checked) == set(mapping) and set(checked) <= set(SETTING_NAMES)
