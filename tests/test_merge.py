"""Averaging rules, checked against independent float64 references computed in memory."""

from __future__ import annotations

import hashlib
from contextlib import ExitStack

import pytest
import torch

from model_soups import merge
from model_soups.config import StorageConfig
from model_soups.merge import CheckpointMismatch, Ingredient, NonFiniteCheckpoint, weighted_average
from model_soups.recipes.digits import DigitsNet
from model_soups.storage import CorruptCheckpoint, MappedCheckpoint, Store


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(StorageConfig(root=f"file://{tmp_path}"))


@pytest.fixture(params=["file", "s3"])
def any_store(request, tmp_path) -> Store:
    """Local disk, or the S3 endpoint: object stores are merged one checkpoint at a time."""
    if request.param == "file":
        return Store(StorageConfig(root=f"file://{tmp_path}"))
    return Store(StorageConfig(root=f"s3://soup-bucket/merge-{tmp_path.name}", endpoint_url=request.getfixturevalue("s3_endpoint")))


def perturbed_states(n: int, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    """Fine-tune-like states of a model with BatchNorm: floats moved, num_batches_tracked differing."""
    torch.manual_seed(0)
    base = DigitsNet(width=4, norm="batch").state_dict()
    states = []
    for i in range(n):
        state = {}
        for name, value in base.items():
            if value.is_floating_point():
                state[name] = (value + 0.1 * torch.randn_like(value)).to(dtype)
            else:
                state[name] = value + 10 * (i + 1)  # integer buffer: must come from the first ingredient
        states.append(state)
    return states


def save_all(store: Store, states) -> list[Ingredient]:
    out = []
    for i, state in enumerate(states):
        url = store.url(f"ing{i}.safetensors")
        out.append(Ingredient(f"ing{i}", url, store.save_checkpoint(url, state)))
    return out


def float64_mean(states, weights=None):
    weights = weights or [1.0] * len(states)
    return {name: sum(w * s[name].double() for w, s in zip(weights, states)) / sum(weights)
            if states[0][name].is_floating_point() else states[0][name] for name in states[0]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_soup_equals_float64_mean_and_keeps_integer_buffers_of_first(any_store, dtype):
    states = perturbed_states(5, dtype)
    soup = weighted_average(any_store, save_all(any_store, states))
    reference = float64_mean(states)
    for name, value in soup.items():
        assert value.dtype == states[0][name].dtype, name
        if value.is_floating_point():
            assert torch.allclose(value.double(), reference[name], atol=1e-6 if dtype == torch.float32 else 1e-2), name
        else:
            assert torch.equal(value, states[0][name]), name
    assert any(n.endswith("num_batches_tracked") for n in soup)


def test_float16_sums_do_not_overflow(store):
    states = [{"w": torch.full((4,), 60000.0, dtype=torch.float16)} for _ in range(3)]  # fp16 max is 65504
    soup = weighted_average(store, save_all(store, states))
    assert torch.isfinite(soup["w"]).all() and soup["w"].dtype == torch.float16
    assert torch.equal(soup["w"], states[0]["w"])


def test_streamed_merge_equals_in_memory_merge(any_store):
    states = perturbed_states(4)
    weights = [0.1, 0.2, 0.3, 0.4]
    streamed = weighted_average(any_store, save_all(any_store, states), weights)
    loaded = [any_store.load_checkpoint(any_store.url(f"ing{i}.safetensors")) for i in range(4)]
    in_memory = {k: (sum(w * s[k].float() for w, s in zip(weights, loaded)) / sum(weights)) if loaded[0][k].is_floating_point()
                 else loaded[0][k] for k in loaded[0]}
    for name in in_memory:
        assert torch.allclose(streamed[name].float(), in_memory[name].float(), atol=1e-6), name


def save_reordered(store: Store, url: str, state: dict[str, torch.Tensor]) -> str:
    """A valid safetensors file with its tensors in reverse name order, as another writer might lay them out."""
    import json
    import struct

    header, data = {}, b""
    for name in sorted(state, reverse=True):
        raw = state[name].reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[state[name].dtype]
        header[name] = {"dtype": dtype, "shape": list(state[name].shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    encoded = json.dumps(header).encode()
    blob = struct.pack("<Q", len(encoded)) + encoded + data
    store.write_bytes(url, blob)
    return hashlib.sha256(blob).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_files_summed_side_by_side_equal_the_streamed_sums_bit_for_bit(tmp_path, monkeypatch, dtype):
    """Local checkpoints are mapped and summed a block at a time across all of them; an object store's are read one
    after the other. Every weighting, accumulation and running sum gives the same bits either way, with blocks
    that end inside tensors and a file laid out in another order."""
    monkeypatch.setattr(merge, "BLOCK", 7)
    local = Store(StorageConfig(root=f"file://{tmp_path}"))
    memory = Store(StorageConfig(root=f"memory://side-by-side-{tmp_path.name}-{dtype}"))
    states = perturbed_states(4, dtype)
    ingredients = {}
    for store in (local, memory):
        ingredients[store] = save_all(store, states[:3])
        url = store.url("reordered.safetensors")
        ingredients[store].append(Ingredient("reordered", url, save_reordered(store, url, states[3])))
    with local.open_checkpoint(ingredients[local][0].url) as reader:
        assert isinstance(reader, MappedCheckpoint)
    with ExitStack() as stack:  # back to back in the first three files, the fourth breaks every run
        readers = merge.open_all(local, ingredients[local], stack)
        assert len(merge.runs(readers[:3], readers[0].info, [1.0] * 3, True)) < len(readers[0].info)
        assert len(merge.runs(readers, readers[0].info, [1.0] * 4, True)) == len(readers[0].info)
    per_tensor = {name: [0.3, 1.0, 1.7 if "weight" in name else 1.0, 0.45] for name in states[0]}
    cases = [(None, torch.float32), ([0.3, 1.0, 1.7, 0.45], torch.float32), (per_tensor, torch.float32), (None, torch.float64)]
    for weights, accumulate in cases:
        for n in (3, 4):  # three files summed in runs of tensors, four one tensor at a time
            first = (weights if weights is None else {k: v[:n] for k, v in weights.items()} if isinstance(weights, dict)
                     else weights[:n])
            sums = {store: merge.weighted_sum(store, ingredients[store][:n], first, accumulate) for store in (local, memory)}
            onto = {store: merge.weighted_sum(store, ingredients[store][:1], None, accumulate, onto=sums[store])
                    for store in (local, memory)}
            # the means, divided a block at a time into the checkpoint's dtype, against whole sums divided (`mean_of`)
            means = {store: weighted_average(store, ingredients[store][:n], first, accumulate) for store in (local, memory)}
            for name in states[0]:
                for result in (sums, onto, means):
                    assert result[local][name].dtype == result[memory][name].dtype, (weights, name)
                    assert torch.equal(result[local][name], result[memory][name]), (weights, accumulate, n, name)
            assert list(means[local]) == list(means[memory]) and means[local]["head.weight"].dtype == dtype


def test_mapped_checkpoint_refuses_an_empty_or_missing_file_and_reads_an_empty_tensor(store):
    open(store.path(store.url("empty.safetensors")), "wb").close()
    with pytest.raises(CorruptCheckpoint, match=r"empty\.safetensors: truncated \(0 bytes\)"):
        store.load_checkpoint(store.url("empty.safetensors"))
    with pytest.raises(CorruptCheckpoint, match=r"absent\.safetensors: not found"):
        store.load_checkpoint(store.url("absent.safetensors"))
    url = store.url("with-empty.safetensors")
    sha = store.save_checkpoint(url, {"empty": torch.zeros(0, 3), "w": torch.ones(2)})
    loaded = store.load_checkpoint(url, sha)
    assert loaded["empty"].shape == (0, 3) and torch.equal(loaded["w"], torch.ones(2))


def test_per_tensor_one_hot_weights_reproduce_an_ingredient(any_store):
    states = perturbed_states(3)
    one_hot = {name: [0.0, 1.0, 0.0] for name in states[0]}
    soup = weighted_average(any_store, save_all(any_store, states), one_hot)
    for name, value in soup.items():
        if value.is_floating_point():
            assert torch.equal(value, states[1][name]), name


def test_float64_accumulation_is_available(store):
    states = perturbed_states(3)
    soup = weighted_average(store, save_all(store, states), accumulate=torch.float64)
    reference = float64_mean(states)
    name = next(n for n in soup if soup[n].is_floating_point())
    assert torch.equal(soup[name], reference[name].float())


def test_shape_mismatch_names_the_key_and_both_shapes(store):
    states = perturbed_states(2)
    states[1]["head.weight"] = torch.zeros(5, 8)
    with pytest.raises(CheckpointMismatch, match=r"ing1\.safetensors: key 'head\.weight' has shape \(5, 8\), pretrained has \(10, 8\)"):
        weighted_average(store, save_all(store, states))


def test_missing_and_unexpected_keys_are_named(store):
    states = perturbed_states(2)
    states[1]["extra.bias"] = states[1].pop("head.bias")
    with pytest.raises(CheckpointMismatch) as error:
        weighted_average(store, save_all(store, states))
    assert "'head.bias' is missing" in str(error.value) and "'extra.bias' is unexpected" in str(error.value)


def test_dtype_mismatch_is_an_error(store):
    states = perturbed_states(2)
    states[1]["head.weight"] = states[1]["head.weight"].half()
    with pytest.raises(CheckpointMismatch, match="'head.weight' has dtype torch.float16"):
        weighted_average(store, save_all(store, states))


def test_nan_ingredient_is_rejected_with_its_name(any_store):
    states = perturbed_states(3)
    states[2]["head.bias"][0] = float("nan")
    with pytest.raises(NonFiniteCheckpoint, match=r"ing2\.safetensors: tensor 'head\.bias' holds NaN or Inf"):
        weighted_average(any_store, save_all(any_store, states))


def test_changed_checkpoint_fails_its_sha256(store):
    ingredients = save_all(store, perturbed_states(2))
    path = store.path(ingredients[1].url)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF  # flip bits inside the last tensor
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="does not match the recorded"):
        weighted_average(store, ingredients)


def test_truncated_checkpoint_is_refused(store):
    (ingredient,) = save_all(store, perturbed_states(1))
    path = store.path(ingredient.url)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match="truncated or malformed"):
        store.load_checkpoint(ingredient.url)


def test_header_that_lies_about_sizes_is_refused(store):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    store.write_bytes(store.url("liar.safetensors"), struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CorruptCheckpoint, match="claims bytes 0..4000"):
        store.load_checkpoint(store.url("liar.safetensors"))


def test_checkpoints_of_one_model_share_one_header(store):
    """N fine-tunes open at once hold one copy of their header, not N; a file laid out otherwise keeps its own."""
    states = perturbed_states(3)
    ingredients = save_all(store, states)
    url = store.url("reordered.safetensors")
    ingredients.append(Ingredient("reordered", url, save_reordered(store, url, states[0])))
    with ExitStack() as stack:
        readers = merge.open_all(store, ingredients, stack)
        assert all(reader.info is readers[0].info for reader in readers[:3])
        assert readers[3].info != readers[0].info
        assert torch.equal(readers[3].tensor("head.weight"), states[0]["head.weight"])


def test_pickle_file_is_not_a_checkpoint(store):
    torch.save({"w": torch.zeros(2)}, store.path(store.url("model.pt")))
    with pytest.raises(CorruptCheckpoint, match="not a safetensors file"):
        store.load_checkpoint(store.url("model.pt"))
