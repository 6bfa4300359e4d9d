"""Every architecture twins_tf builds, in one table, and `build_model` over it.

A family module builds its networks (`resnet`: torchvision ResNets with BatchNormalization;
`convnext`: timm ConvNeXts and Singh et al.'s ConvStem ConvNeXts, LayerNorm only);
this table says which family builds an arch and whether that family has BatchNormalization,
which TWINS needs: its two wings are BN's population statistics (Frozen) and batch statistics
(Adaptive), so a network normalised only by LayerNorm has nothing to twin.
"""

from twins_tf.models import convnext, resnet

# family -> (its ARCHITECTURES, its builder, arch -> whether it has BatchNormalization)
FAMILIES = {
    "resnet": (resnet.ARCHITECTURES, resnet.build_resnet, lambda arch: True),
    "convnext": (convnext.ARCHITECTURES, convnext.build_convnext, lambda arch: False),
}
ARCHITECTURES = {arch: family for family, (archs, _, _) in FAMILIES.items() for arch in archs}
TWIN_SUFFIX = "_twin"


def family_of(arch):
    """The family name ("resnet", ...) of `arch`; ValueError naming the choices if unknown."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown arch {arch!r}: expected one of {', '.join(sorted(ARCHITECTURES))}."
        )
    return ARCHITECTURES[arch]


def has_batch_norm(arch):
    """Whether `arch` has BatchNormalization layers, the ones a twin model splits in two wings."""
    return FAMILIES[family_of(arch)][2](arch)


def twin_methods_need_batch_norm(arch):
    """The one-line refusal of a twin model of an arch without BatchNormalization."""
    return (
        f"{arch} has no BatchNormalization: TWINS needs BN's population statistics (its "
        "Frozen wing) and batch statistics (its Adaptive wing), so twin methods do not apply; "
        "use clean, at, trades, l2sp or autolora."
    )


def build_model(
    arch, num_classes, *, twin=False, input_shape=(224, 224, 3), upsample=1, synchronized=False
):
    """A classifier of `arch`: [0, 1] NHWC images in, normalisation inside, logits out.

    Args:
      arch: any key of `ARCHITECTURES`.
      num_classes: width of the fresh head.
      twin: `TwinBatchNormalization` for every BatchNormalization of the network (TWINS).
      input_shape: (height, width, 3) of the images fed to the model, before upsampling.
      upsample: integer nearest-neighbour upsampling inside the model, for small images.
      synchronized: cross-replica BN statistics (see `twins_tf.models.build_resnet`).

    Returns:
      A functional `keras.Model` named `arch` (`arch + "_twin"` when twin).

    Raises:
      ValueError: unknown arch, bad sizes, or twin=True for an arch without BatchNormalization.
    """
    family = family_of(arch)
    if twin and not has_batch_norm(arch):
        raise ValueError(twin_methods_need_batch_norm(arch))
    builder = FAMILIES[family][1]
    return builder(
        arch,
        num_classes,
        twin=twin,
        input_shape=input_shape,
        upsample=upsample,
        synchronized=synchronized,
    )


def arch_of(model):
    """The arch a `build_model` model was built as, from its name; ValueError otherwise."""
    name = model.name[: -len(TWIN_SUFFIX)] if model.name.endswith(TWIN_SUFFIX) else model.name
    if name not in ARCHITECTURES:
        raise ValueError(
            f"model {model.name!r} is not a twins_tf.models.build_model network; build it with "
            "build_model(arch, ...) to load pre-trained weights."
        )
    return name
