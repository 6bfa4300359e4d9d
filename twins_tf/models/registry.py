"""Every architecture twins_tf builds, in one table, and `build_model` over it.

A family module builds its networks (`resnet`: torchvision ResNets with BatchNormalization;
`convnext`: timm ConvNeXts and Singh et al.'s ConvStem ConvNeXts, LayerNorm only;
`vit`: timm Vision Transformers and Singh et al.'s ConvStem ViTs, LayerNorm only);
this table says which family builds an arch and whether that family has BatchNormalization,
which TWINS needs: its two wings are BN's population statistics (Frozen) and batch statistics
(Adaptive), so a network normalised only by LayerNorm has nothing to twin.
"""

import collections

from twins_tf import methods
from twins_tf.models import convnext, resnet, vit

Family = collections.namedtuple(
    "Family", ["architectures", "build", "has_batch_norm", "input_size_problem"]
)
Family.__doc__ = """How a family builds its archs.

`build(arch, num_classes, *, twin, input_shape, upsample, synchronized)`; `has_batch_norm(arch)`;
`input_size_problem(arch, size)`: None if the network takes `size` x `size` images (after
upsampling), else a one-line message naming the nearest sizes it takes."""

FAMILIES = {
    "resnet": Family(resnet.ARCHITECTURES, resnet.build_resnet, lambda arch: True, None),
    "vit": Family(vit.ARCHITECTURES, vit.build_vit, lambda arch: False, vit.input_size_problem),
    "convnext": Family(
        convnext.ARCHITECTURES,
        convnext.build_convnext,
        lambda arch: False,
        convnext.input_size_problem,
    ),
}
ARCHITECTURES = {arch: name for name, family in FAMILIES.items() for arch in family.architectures}
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
    return FAMILIES[family_of(arch)].has_batch_norm(arch)


def weights_depend_on_image_size(arch):
    """Whether `arch`'s weights have the shape of its images: a ViT's position embeddings are
    one per patch; convolutions, Dense and norm layers fit any size."""
    return family_of(arch) == "vit"


def input_size_problem(arch, size):
    """None if `arch` takes `size` x `size` images (after upsampling), else why not, in a line."""
    check = FAMILIES[family_of(arch)].input_size_problem
    return check(arch, size) if check else None


def twin_methods_need_batch_norm(arch):
    """The one-line refusal of a twin model of an arch without BatchNormalization."""
    plain = ", ".join(name for name, method in methods.METHODS.items() if not method.twin)
    return (
        f"{arch} has no BatchNormalization: TWINS needs BN's population statistics (its "
        "Frozen wing) and batch statistics (its Adaptive wing), so twin methods do not apply "
        f"to it; use one of {plain}."
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
    return FAMILIES[family].build(
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
