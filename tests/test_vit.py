"""The ViT family against timm: logits, position-embedding resampling and an AT step.

timm (in its own environment, `timm_testlib`) builds each network with every parameter
redrawn at a scale where it matters (`tests/timm_reference.py: randomise`: weights
N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2), cls_token and pos_embed
N(0, 0.5^2)), so a wrong block, head split or norm shows in the logits.  Its state dict is
loaded into our model through `load_torch_state_dict` and both run on the same [0, 1] images
(timm fed the normalised NCHW images, ours the pixels).  Bar: max |ours - timm| <= 1e-4 *
max |timm| (float32 through 12 blocks).

Our arch -> timm model:
    vit_s16           vit_small_patch16_224
    vit_b16           vit_base_patch16_224
    vit_s16_convstem  vit_small_patch16_224 with patch_embed.proj = Singh et al.'s ConvStem
    vit_b16_convstem  vit_base_patch16_224 with patch_embed.proj = Singh et al.'s ConvStem
(the ConvStem module of the reference is written in timm_reference.py from the layout of
github.com/nmndeep/revisiting-at; vit_b16_convstem takes unnormalised [0, 1] pixels, as
RobustBench runs it, so timm is fed those.)
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import timm_testlib

from twins_tf import AdversarialTrainer, lora
from twins_tf.attacks import PGD
from twins_tf.models import build_model, registry, vit
from twins_tf.weights import CheckpointError, load_torch_state_dict, read_torch_checkpoint, vit_keys

TIMM_NAMES = {
    "vit_s16": ("vit_small_patch16_224", False),
    "vit_b16": ("vit_base_patch16_224", False),
    "vit_s16_convstem": ("vit_small_patch16_224", True),
    "vit_b16_convstem": ("vit_base_patch16_224", True),
}
CLASSES = 7


def _images(tmp_path, shape, seed=0):
    images = np.random.default_rng(seed).uniform(size=shape).astype("float32")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "images.npy"
    np.save(path, images)
    return images, str(path)


def _normalisation(arch):
    _, _, _, _, mean, std = vit.ARCHITECTURES[arch]
    return list(mean), list(std)


def _assert_close(ours, reference, rel=1e-4):
    """max |ours - reference| <= rel * max |reference|; returns the two figures."""
    diff = float(np.max(np.abs(np.asarray(ours) - reference)))
    scale = float(np.max(np.abs(reference)))
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} * max |reference| {scale:.3g}"
    return diff, diff / scale


def _timm_logits(tmp_path, arch, size, images_path, depth=None, seed=0, scale=None):
    name, convstem = TIMM_NAMES[arch]
    mean, std = _normalisation(arch)
    kwargs = {"num_classes": CLASSES, "img_size": size}
    if depth is not None:
        kwargs["depth"] = depth
    return timm_testlib.run(
        tmp_path,
        "vit_logits",
        model=name,
        kwargs=kwargs,
        convstem=convstem,
        seed=seed,
        scale=scale or {},
        images=images_path,
        mean=mean,
        std=std,
    )


def check_logits_parity(tmp_path, arch, size=32, batch=3, depth=None, scale=None):
    images, path = _images(tmp_path, (batch, size, size, 3))
    reference = _timm_logits(tmp_path, arch, size, path, depth=depth, scale=scale)
    model = vit.build_vit(arch, CLASSES, input_shape=(size, size, 3), _depth=depth)
    loaded = load_torch_state_dict(model, reference["state"], head=True)
    assert set(loaded) == set(reference["state"])
    if depth is None:
        assert vit_keys.arch_from_state_dict(reference["state"]) == arch
    ours = model(images, training=False).numpy()
    diff, rel = _assert_close(ours, reference["logits"])
    print(f"{arch} @ {size} px: max |diff| {diff:.3g}, relative {rel:.3g}")


# === parity with timm ========================================================================
@pytest.mark.parametrize("arch, size", [("vit_s16", 32), ("vit_s16_convstem", 64)])
def test_logits_match_timm(tmp_path, arch, size):
    """32 px: a 2x2 grid; 64 px: 4x4, through the ConvStem's four stride-2 convolutions."""
    check_logits_parity(tmp_path, arch, size)


@pytest.mark.parametrize(
    "arch, scale",
    [
        ("vit_s16", {"patch_embed.": 1e-3, "pos_embed": 1e-3, "cls_token": 1e-3}),
        ("vit_s16_convstem", {"patch_embed.proj.stem.0.": 1e-3}),
    ],
)
def test_layer_norm_epsilon_is_timms(tmp_path, arch, scale):
    """Random weights leave every LayerNorm input with a variance near 1, where epsilon 1e-6
    and 1e-5 give the same logits to 1e-5; shrinking the weights before the first block's
    norm1 (ViT) or the ConvStem's first LayerNorm to 1e-3 makes that variance ~1e-6, where
    the two differ by far more than the bar.  One block keeps it cheap."""
    check_logits_parity(tmp_path, arch, depth=1, scale=scale)


def test_every_gelu_is_the_exact_erf_form():
    """timm's nn.GELU() is x * Phi(x) with the erf; the tanh approximation differs by up to
    ~2e-4, too little to show through random-weight logits at the 1e-4 bar, so each GELU of
    a ConvStem ViT is checked on its own against math.erf."""
    model = vit.build_vit("vit_s16_convstem", CLASSES, input_shape=(32, 32, 3), _depth=2)
    x = np.linspace(-6, 6, 1201, dtype="float32")
    expected = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()])
    gelus = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert len(gelus) == 4 + 2  # four in the stem, one per block
    for layer in gelus:
        np.testing.assert_allclose(layer(x).numpy(), expected, atol=2e-6, err_msg=layer.name)


@pytest.mark.slow  # ViT-B: 86M parameters through the npz exchange, ~40 s each
@pytest.mark.parametrize("arch", ["vit_b16", "vit_b16_convstem"])
def test_base_logits_match_timm(tmp_path, arch):
    check_logits_parity(tmp_path, arch)


def test_position_embeddings_resample_as_timm_loads_a_224_checkpoint(tmp_path):
    """A 224 px state dict (14x14 grid) loaded into smaller (32 px: 2x2), non-square (32x64)
    and larger (288 px: 18x18) models: pos_embed equals timm's `resample_abs_pos_embed` and
    the logits equal timm's model created at that img_size from the same state dict (timm's
    `checkpoint_filter_fn`).  Two blocks keep it cheap; the resampling does not depend on
    the depth."""
    sizes = [(32, 32), (32, 64), (288, 288)]
    targets, inputs = [], []
    for index, (rows, cols) in enumerate(sizes):
        images, path = _images(tmp_path / str(index), (2, rows, cols, 3), seed=index)
        targets.append({"img_size": [rows, cols], "images": path})
        inputs.append(images)
    mean, std = _normalisation("vit_s16")
    reference = timm_testlib.run(
        tmp_path,
        "vit_resample",
        model="vit_small_patch16_224",
        kwargs={"num_classes": CLASSES, "depth": 2},
        targets=targets,
        seed=1,
        mean=mean,
        std=std,
    )
    assert reference["state"]["pos_embed"].shape == (1, 1 + 14 * 14, 384)
    for index, ((rows, cols), images) in enumerate(zip(sizes, inputs)):
        grid = (rows // 16, cols // 16)
        ours = vit_keys.resample_position_embedding(reference["state"]["pos_embed"], grid)
        expected = reference[f"pos_embed_{index}"]
        assert ours.shape == expected.shape == (1, 1 + grid[0] * grid[1], 384)
        _assert_close(ours, expected, rel=1e-6)

        model = vit.build_vit("vit_s16", CLASSES, input_shape=(rows, cols, 3), _depth=2)
        load_torch_state_dict(model, reference["state"], head=True)
        np.testing.assert_array_equal(model.get_layer("embed").pos_embed.numpy(), ours)
        _assert_close(model(images, training=False).numpy(), reference[f"logits_{index}"])


def test_resampling_keeps_a_same_grid_table_and_refuses_a_non_square_one():
    table = np.random.default_rng(0).normal(size=(1, 1 + 4, 8)).astype("float32")
    assert vit_keys.resample_position_embedding(table, (2, 2)) is table
    with pytest.raises(CheckpointError, match="not a square grid"):
        vit_keys.resample_position_embedding(table[:, :4], (4, 4))


# === an adversarial training step against PyTorch ============================================
@pytest.mark.parametrize(
    "depth",
    [2, pytest.param(None, marks=pytest.mark.slow, id="12 blocks")],
    ids=lambda depth: f"{depth} blocks" if depth else None,
)
def test_two_at_steps_match_a_pytorch_loop_on_timm(tmp_path, depth):
    """vit_s16 at 32 px, batch 4, with two of its blocks (`_depth`, and timm's `depth`) by
    default and all twelve when slow tests run: two AT steps (PGD-2 without random start, CE
    at x_adv, SGD momentum 0.9 with coupled weight decay on every variable) against a plain
    PyTorch loop on timm's model (timm_reference.vit_at_steps).  Step 1's adversarial
    examples to 1e-6, the losses to 1e-4 / 1e-3 relative, every variable after each step to
    1e-4 / 1e-3 relative to its largest entry (as the ResNet parity in test_trainer.py)."""
    lr, momentum, wd, eps, alpha, steps = 0.05, 0.9, 1e-3, 8 / 255, 2 / 255, 2
    # A pixel whose input gradient is a tie at float32 rounding level can take its sign step
    # either way in the two frameworks (with the images of seed 3 one pixel of 12288 had a
    # gradient of 1e-8 against a median of 7e-3 and ended 2 alpha apart); these have none.
    rng = np.random.default_rng(4)
    images = rng.uniform(size=(2, 4, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, size=(2, 4))
    batches = tmp_path / "batches.npz"
    np.savez(batches, images=images, labels=labels)
    mean, std = _normalisation("vit_s16")
    reference = timm_testlib.run(
        tmp_path,
        "vit_at_steps",
        model="vit_small_patch16_224",
        kwargs={"num_classes": CLASSES, "img_size": 32, **({"depth": depth} if depth else {})},
        seed=2,
        batches=str(batches),
        eps=eps,
        alpha=alpha,
        pgd_steps=steps,
        lr=lr,
        momentum=momentum,
        weight_decay=wd,
        mean=mean,
        std=std,
    )
    model = vit.build_vit("vit_s16", CLASSES, input_shape=(32, 32, 3), _depth=depth)
    load_torch_state_dict(model, reference["state"], head=True)
    keys = vit_keys.torch_keys(model)
    attack = PGD(eps, alpha, steps)
    trainer = AdversarialTrainer(model, method="at", attack=attack, weight_decay=wd)
    trainer.compile(keras.optimizers.SGD(lr, momentum=momentum))

    x_adv = tf.function(attack)(model, images[0], labels[0])
    np.testing.assert_allclose(x_adv.numpy(), reference["x_adv_0"], atol=1e-6)
    for step in range(2):
        data = tf.data.Dataset.from_tensors((images[step], labels[step]))
        loss = trainer.fit(data, verbose=0).history["loss"][0]
        rel = 1e-4 if step == 0 else 1e-3
        np.testing.assert_allclose(loss, reference[f"loss_{step}"], rtol=rel)
        worst = 0.0
        for key, (variables, transform) in keys.items():
            expected = reference[f"after_{step}/{key}"]
            expected = transform(expected) if transform else expected
            diff = np.max(np.abs(variables[0].numpy() - expected)) / np.max(np.abs(expected))
            worst = max(worst, diff)
            assert diff <= rel, f"step {step + 1}: {key} off by {diff:.3g} of its largest entry"
        print(f"step {step + 1}: worst variable relative difference {worst:.3g}")


# === building ================================================================================
def test_twin_is_refused_with_the_registry_message():
    with pytest.raises(ValueError) as error:
        build_model("vit_s16", CLASSES, twin=True, input_shape=(32, 32, 3))
    assert str(error.value) == registry.twin_methods_need_batch_norm("vit_s16")
    assert not any(registry.has_batch_norm(arch) for arch in vit.ARCHITECTURES)
    with pytest.raises(ValueError, match="has no BatchNormalization"):
        vit.build_vit("vit_s16_convstem", CLASSES, twin=True, input_shape=(32, 32, 3))


@pytest.mark.parametrize(
    "shape, upsample, message",
    [
        (
            (30, 32, 3),
            1,
            "height that, times upsample=1, is a multiple of its patch size 16; "
            "got 30: use 16 or 32.",
        ),
        (
            (32, 20, 3),
            2,
            "width that, times upsample=2, is a multiple of its patch size 16; "
            "got 20: use 16 or 24.",
        ),
        ((10, 16, 3), 3, "got 10: use 16."),
        ((None, 32, 3), 1, "needs a known image height"),
    ],
)
def test_sizes_the_patches_do_not_tile_are_refused_with_the_nearest_valid_ones(
    shape, upsample, message
):
    with pytest.raises(ValueError) as error:
        build_model("vit_s16", CLASSES, input_shape=shape, upsample=upsample)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="ConvStem's total stride 16"):
        build_model("vit_s16_convstem", CLASSES, input_shape=(24, 24, 3))


def test_the_registry_names_the_nearest_sizes_a_vit_takes():
    assert registry.input_size_problem("vit_b16", 224) is None
    assert registry.input_size_problem("vit_s16", 60) == (
        "vit_s16 takes image sizes that are multiples of its patch size 16; got 60: use 48 or 64."
    )
    assert "ConvStem's total stride 16; got 8: use 16." in registry.input_size_problem(
        "vit_b16_convstem", 8
    )


def test_upsampled_small_images_build_the_grid_of_the_upsampled_size():
    model = build_model("vit_s16", CLASSES, input_shape=(8, 16, 3), upsample=4)
    assert model.get_layer("embed").pos_embed.shape == (1, 1 + 2 * 4, 384)
    assert model(np.zeros((1, 8, 16, 3), "float32")).shape == (1, CLASSES)


def _random_torch_state(model, seed=0):
    """A timm-layout state dict for `model` (shapes from its variables, laid out as PyTorch
    stores them), random values."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, (variables, _) in vit_keys.torch_keys(model).items():
        shape = tuple(variables[0].shape)
        if len(shape) == 4:  # HWIO -> OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:  # (in, out) -> (out, in)
            shape = shape[::-1]
        state[key] = rng.normal(size=shape).astype("float32")
    return state


def test_a_checkpoint_of_another_vit_is_named_in_the_error():
    small = vit.build_vit("vit_s16", CLASSES, input_shape=(32, 32, 3), _depth=1)
    state = _random_torch_state(small)
    convstem = vit.build_vit("vit_s16_convstem", CLASSES, input_shape=(32, 32, 3), _depth=1)
    with pytest.raises(CheckpointError, match="missing keys: patch_embed.proj.stem.0.bias"):
        load_torch_state_dict(convstem, state)


def test_timm_keys_pass_through_the_checkpoint_reader_unchanged(tmp_path):
    import torch

    model = vit.build_vit("vit_s16_convstem", CLASSES, input_shape=(32, 32, 3), _depth=1)
    state = _random_torch_state(model)
    path = tmp_path / "vit.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    read = read_torch_checkpoint(path)
    assert set(read) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(read[key], value)


def test_a_224_px_checkpoint_converts_for_32_px_images_and_loads_into_a_fresh_model(tmp_path):
    """`convert_checkpoint(image_size=32)` of a 224 px timm-layout .pth, then
    `load_pretrained` into a 32 px model with a fresh head: every backbone variable is the
    checkpoint's (pos_embed resampled to the 2x2 grid), the head keeps its own."""
    import torch

    from twins_tf.weights import convert_checkpoint, load_pretrained

    source = build_model("vit_s16_convstem", 1000, input_shape=(224, 224, 3))
    state = _random_torch_state(source)
    checkpoint, converted = tmp_path / "vit.pth", tmp_path / "vit.weights.h5"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, checkpoint)
    convert_checkpoint(checkpoint, "vit_s16_convstem", converted, image_size=32)
    model = build_model("vit_s16_convstem", CLASSES, input_shape=(16, 16, 3), upsample=2)
    fresh_head = model.get_layer("head").kernel.numpy()
    load_pretrained(model, converted)
    np.testing.assert_array_equal(model.get_layer("head").kernel.numpy(), fresh_head)
    for key, (variables, transform) in vit_keys.torch_keys(model).items():
        if key.startswith(vit_keys.HEAD_PREFIX):
            continue
        expected = transform(state[key]) if transform else state[key]
        np.testing.assert_array_equal(variables[0].numpy(), expected, err_msg=key)
    assert model.get_layer("embed").pos_embed.shape == (1, 5, 384)


# === Keras machinery: AutoLoRa, serialisation, mixed precision ===============================
def test_autolora_adapts_every_attention_and_mlp_dense_and_keeps_the_custom_layers():
    model = vit.build_vit("vit_s16", CLASSES, input_shape=(32, 32, 3), _depth=2)
    names = {layer.name for layer in lora.default_targets(model)}
    expected = {
        f"blocks_{b}_{m}" for b in range(2) for m in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")
    }
    assert names == expected  # not the patch projection (the stem), not the head
    adapted = lora.add_lora(model, rank=2)
    kinds = {type(layer) for layer in adapted.layers}
    assert {vit.ClassTokenPositionEmbedding, vit.SelfAttention, vit.ClassTokenPool} <= kinds
    assert len(lora.lora_branches(adapted)) == len(expected)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
    main = model(x).numpy()
    np.testing.assert_array_equal(adapted(x).numpy(), main)
    for branch in lora.lora_branches(adapted):
        branch.lora_b.assign(np.full(branch.lora_b.shape, 0.05, "float32"))
    with lora.natural_branch():
        natural = adapted(x).numpy()
    assert np.max(np.abs(natural - main)) > 1e-3
    np.testing.assert_array_equal(adapted(x).numpy(), main)  # branch off: the main path

    convstem = vit.build_vit("vit_s16_convstem", CLASSES, input_shape=(32, 32, 3), _depth=1)
    adapted = lora.add_lora(convstem, rank=2)  # the ConvStem's 3x3 and 1x1 convs but its first
    assert [b.target for b in lora.lora_branches(adapted)][:4] == [
        f"patch_embed_proj_stem_{index}" for index in (3, 6, 9, 12)
    ]
    np.testing.assert_array_equal(adapted(x).numpy(), convstem(x).numpy())


def test_an_autolora_step_trains_the_branch_of_every_attention_and_mlp_dense():
    """The AutoLoRa step on a LoRA ViT: B starts at zero, and one step gives every branch a
    gradient through its natural forward (the step's arithmetic is test_autolora's)."""
    model = vit.build_vit("vit_s16", CLASSES, input_shape=(32, 32, 3), _depth=1)
    adapted = lora.add_lora(model, rank=2)
    trainer = AdversarialTrainer(adapted, method="autolora", attack=PGD(8 / 255, 2 / 255, 1))
    trainer.compile(keras.optimizers.SGD(0.1, momentum=0.9))
    trainer.autolora_lambda1.assign(0.5)
    trainer.autolora_lambda2.assign(3.0)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(4, 32, 32, 3)).astype("float32"), rng.integers(0, CLASSES, 4)
    logs = trainer.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    for branch in lora.lora_branches(adapted):
        assert np.max(np.abs(branch.lora_b.numpy())) > 0, branch.name


def test_json_and_weights_round_trip(tmp_path):
    model = vit.build_vit("vit_s16_convstem", CLASSES, input_shape=(32, 32, 3), _depth=1)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
    clone = keras.models.model_from_json(model.to_json())
    assert json.loads(clone.to_json()) == json.loads(model.to_json())
    path = str(tmp_path / "vit.weights.h5")
    model.save_weights(path)
    clone.load_weights(path)
    np.testing.assert_array_equal(clone(x).numpy(), model(x).numpy())


def test_attention_stays_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = vit.build_vit("vit_s16", CLASSES, input_shape=(32, 32, 3), _depth=1)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("blocks_0_attn").compute_dtype == "float32"
    assert model.get_layer("blocks_0_attn_qkv").compute_dtype == "bfloat16"
    assert model.get_layer("head").compute_dtype == "float32"
    out = model(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32"))
    assert out.dtype == "float32" and np.all(np.isfinite(out.numpy()))
