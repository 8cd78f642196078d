"""The mapping table and its transforms: consistent both ways, and the documented exceptions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptcore.community.hf import HF_SCHEME
from ckptcore.community.mapping import (
    LAYOUTS,
    TRANSFORMS,
    Arch,
    Geometry,
    all_roles,
    bind_rows,
    from_nemo,
    nemo_config,
    role_shape,
    to_nemo,
)
from ckptcore.community.timm import TIMM_SCHEME
from ckptcore.model.vit import expected_shapes

geometries = st.builds(
    Geometry,
    hidden=st.integers(1, 6),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 3),
    ffn=st.integers(1, 5),
    layers=st.integers(1, 3),
    patch=st.integers(1, 3),
    image=st.just(0),
    channels=st.integers(1, 3),
    classes=st.integers(1, 4),
).map(
    lambda g: Geometry(
        g.hidden, g.heads, g.head_dim, g.ffn, g.layers, g.patch, g.patch * 2, g.channels, g.classes
    )
)


def _random_roles(g: Geometry, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {r: torch.randn(role_shape(r, g), generator=gen) for r in all_roles(g.layers)}


def _to_state(roles: dict, g: Geometry, layout: str, legacy: bool = False) -> dict:
    return {
        key: to_nemo(b, roles.__getitem__, g)
        for key, b in bind_rows(g.layers, layout, legacy).items()
    }


@settings(max_examples=40, deadline=None)
@given(g=geometries, seed=st.integers(0, 2**16))
def test_exact_transforms_invert(g, seed):
    roles = _random_roles(g, seed)
    for layout in LAYOUTS:
        for b in bind_rows(g.layers, layout).values():
            if not b.transform.exact:
                continue
            inputs = [roles[r] for r in b.role_keys]
            back = b.transform.inverse(b.transform.forward(inputs, g), g)
            assert all(torch.equal(x, y) for x, y in zip(inputs, back, strict=True)), b.nemo_key


@settings(max_examples=25, deadline=None)
@given(g=geometries, seed=st.integers(0, 2**16))
def test_linear_encoder_round_trip_is_exact(g, seed):
    roles = _random_roles(g, seed)
    back = from_nemo(_to_state(roles, g, "linear_encoder"), g, "linear_encoder", False)
    assert set(back) == set(roles)
    assert all(torch.equal(roles[r], back[r]) for r in roles)


@settings(max_examples=25, deadline=None)
@given(g=geometries, seed=st.integers(0, 2**16))
def test_conv1_round_trip_moves_only_the_patch_bias(g, seed):
    roles = _random_roles(g, seed)
    back = from_nemo(_to_state(roles, g, "conv1"), g, "conv1", False)
    for r in roles:
        if r == "patch_bias":
            assert torch.equal(back[r], torch.zeros_like(roles[r]))
        elif r == "pos_embed":
            assert torch.equal(back[r][:, 0], roles[r][:, 0])
            assert torch.equal(back[r][:, 1:], roles[r][:, 1:] + roles["patch_bias"])
        else:
            assert torch.equal(back[r], roles[r]), r


def test_qkv_interleave_is_the_reference_per_head_stack():
    """nemo-formats.md 6.4: stack([q.view(n,hn,H), k..., v...], dim=1).reshape(3H, H)."""
    n, hn, h = 3, 4, 12
    g = Geometry(h, n, hn, 8, 1, 2, 4, 3, 2)
    q, k, v = (torch.randn(n * hn, h) for _ in range(3))
    want = torch.stack([q.view(n, hn, h), k.view(n, hn, h), v.view(n, hn, h)], dim=1)
    got = TRANSFORMS["qkv_interleave"].forward([torch.cat([q, k, v])], g)
    assert torch.equal(got, want.reshape(3 * n * hn, h))
    qb, kb, vb = (torch.randn(n * hn) for _ in range(3))
    want_b = torch.stack([qb.view(n, hn), kb.view(n, hn), vb.view(n, hn)], dim=1).reshape(-1)
    assert torch.equal(TRANSFORMS["qkv_interleave"].forward([torch.cat([qb, kb, vb])], g), want_b)


def test_conv_to_linear_matches_nemo_flatten():
    """linear.weight[o, (i*P + j)*C + c] == conv.weight[o, c, i, j] (einops (p1 p2 c))."""
    g = Geometry(5, 1, 5, 4, 1, 3, 6, 2, 2)
    w = torch.randn(5, 2, 3, 3)
    lin = TRANSFORMS["conv_to_linear"].forward([w], g)
    for o, c, i, j in [(0, 0, 0, 0), (4, 1, 2, 1), (2, 1, 0, 2)]:
        assert lin[o, (i * 3 + j) * 2 + c] == w[o, c, i, j]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("legacy", [False, True])
def test_table_covers_every_nemo_tensor(layout, legacy):
    g = Geometry(16, 4, 4, 32, 3, 4, 16, 3, 5)
    cfg = nemo_config(Arch(g, 1e-6, "gelu"), layout, torch.float32)
    cfg["megatron_legacy"] = legacy
    shapes = {k: s for k, s in expected_shapes(cfg).items() if s is not None}
    bound = bind_rows(g.layers, layout, legacy)
    assert list(bound) == list(shapes)  # same keys, same order
    roles = _random_roles(g, 0)
    for key, b in bound.items():
        assert tuple(to_nemo(b, roles.__getitem__, g).shape) == shapes[key], key


@pytest.mark.parametrize("scheme", [HF_SCHEME, TIMM_SCHEME], ids=lambda s: s.name)
def test_schemes_name_every_role_once(scheme):
    g = Geometry(16, 4, 4, 32, 2, 4, 16, 3, 5)
    keys = [k for r in all_roles(g.layers) for k in scheme.keys_for(r)]
    assert len(keys) == len(set(keys))
    for r in all_roles(g.layers):
        parts = scheme.part_shapes(r, g)
        assert sum(p[0] for p in parts) == role_shape(r, g)[0]
