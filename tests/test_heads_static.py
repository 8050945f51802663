"""The heads' losses on CUDA: static shapes, no host sync, one device (checked on fake CUDA tensors, no GPU needed),
and the static RetinaNet loss against the loss it replaced."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou, sigmoid_focal_loss

from mthl_ds.config import DatasetConfig
from mthl_ds.geometry import IGNORE_INDEX
from mthl_ds.models.heads import (RetinaNetDetectionHead, SyncBatchNorm2d, level_anchors, padded_targets,
                                  retina_cell_anchors)
from mthl_ds.tasks import task_spec

CHANNELS = [16, 32, 64, 128]


def max_iou_assign(iou):
    """mmdet 3.3.0's ``MaxIoUAssigner.assign_wrt_overlaps`` (pos 0.5, neg 0.4, min_pos_iou 0,
    gt_max_assign_all) on one image's (G, N) IoUs, its loop as written there, in the matcher's code: box index,
    -1 background, -2 ignored."""
    matched = torch.full((iou.shape[1],), -2, dtype=torch.long)
    best, argmax = iou.max(dim=0)
    matched[(best >= 0) & (best < 0.4)] = -1
    matched[best >= 0.5] = argmax[best >= 0.5]
    for i, highest in enumerate(iou.max(dim=1).values):
        if highest >= 0:
            matched[iou[i] == highest] = i
    return matched


def reference_loss(head, output, batch, reduce_mean=None):
    """``RetinaNetDetectionHead.loss`` as it was before it took static shapes (commit 1f57bbc), verbatim but for
    its anchors, built here on the CPU as it built them, and its matcher, now mmdet's (:func:`max_iou_assign`):
    per image, boolean-mask indexing, torchvision's ``BoxCoder``, a Python count of positives."""
    matcher = max_iou_assign
    box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    anchors = torch.cat([level_anchors(retina_cell_anchors(s), s, *p.shape[-2:]).to(p.device)
                         for s, p in zip(head.strides, output["pyramid"])])
    cls_logits, deltas = output["cls_logits"].float(), output["bbox_regression"].float()
    focal, l1, positives = cls_logits.new_zeros(()), cls_logits.new_zeros(()), 0
    for logits, regression, boxes, labels in zip(cls_logits, deltas, batch["boxes"], batch["labels"]):
        if len(boxes):
            matched = matcher(box_iou(boxes, anchors))
        else:  # every anchor is background
            matched = torch.full((len(anchors),), det_utils.Matcher.BELOW_LOW_THRESHOLD, device=anchors.device)
        foreground = matched >= 0
        target = torch.zeros_like(logits)
        target[foreground, labels[matched[foreground]]] = 1.0
        scored = matched != det_utils.Matcher.BETWEEN_THRESHOLDS
        focal = focal + sigmoid_focal_loss(logits[scored], target[scored], reduction="sum")
        targets = box_coder.encode_single(boxes[matched[foreground]], anchors[foreground])
        l1 = l1 + F.l1_loss(regression[foreground], targets, reduction="sum")
        positives += max(int(foreground.sum()), 1)
    count = torch.tensor(float(positives))
    avg_factor = (reduce_mean(count) if reduce_mean is not None else count).clamp(min=1.0).to(focal.device)
    focal, l1 = focal / avg_factor, l1 / avg_factor
    return focal + l1, {"focal": float(focal.detach()), "l1": float(l1.detach()), "positives": positives}


def random_detection_batch(seed: int, num_classes: int = 4, height: int = 128, width: int = 160):
    """Head outputs (leaves that need grad) and targets on a ``height`` x ``width`` canvas: random overlapping
    boxes, an image without boxes, duplicate boxes with other labels (ties between boxes), boxes on the anchor
    grid (ties between anchors), boxes too small for any anchor to reach 0.4 IoU, and one outside the canvas
    (IoU 0 with every anchor: torchvision then matches every anchor tied at 0)."""
    g = torch.Generator().manual_seed(seed)
    strides = RetinaNetDetectionHead.strides
    pyramid = [torch.zeros(5, 1, -(-height // s), -(-width // s)) for s in strides]
    anchors = sum(p.shape[-2] * p.shape[-1] * 9 for p in pyramid)

    def boxes(n, lo=4.0, hi=90.0):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([width - lo, height - lo])
        wh = lo + torch.rand(n, 2, generator=g) * (hi - lo)
        return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([width, height]))], dim=1)

    grid = torch.tensor([[-16., -16., 16., 16.], [0., 0., 32., 32.], [-32., -16., 32., 16.]])  # on 8 / 16 px cells
    dup = boxes(2)
    images = [boxes(6), torch.zeros(0, 4), torch.cat([dup, dup, grid + 24]),
              torch.cat([boxes(3, 1.0, 4.0), torch.tensor([[400., 400., 420., 430.]])]), boxes(15, 10.0, 60.0)]
    labels = [torch.randint(0, num_classes, (len(b),), generator=g) for b in images]
    output = {"cls_logits": (3 * torch.randn(5, anchors, num_classes, generator=g)).requires_grad_(),
              "bbox_regression": torch.randn(5, anchors, 4, generator=g).requires_grad_(), "pyramid": pyramid}
    return output, {"image": torch.zeros(5, 3, height, width), "boxes": images, "labels": labels}


def test_static_matching_equals_mmdets_max_iou_assigner():
    """Every image's matches (gt index, -1 below 0.4, -2 between 0.4 and 0.5, each box's best anchors with ties)
    equal mmdet's ``MaxIoUAssigner`` loop exactly; a batch covers every case of the assigner, and some anchors
    go to another box than torchvision's ``Matcher`` gives them."""
    head = RetinaNetDetectionHead(CHANNELS, 4, 32)
    matcher = max_iou_assign
    torchvision_matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    seen, moved = set(), 0
    for seed in range(3):
        output, batch = random_detection_batch(seed)
        anchors = head.all_anchors(output["pyramid"])
        boxes, labels = padded_targets(batch["boxes"], batch["labels"])
        matched = head.match(box_iou(boxes, anchors), labels >= 0)
        for ours, image_boxes in zip(matched, batch["boxes"]):
            theirs = matcher(box_iou(image_boxes, anchors)) if len(image_boxes) else torch.full_like(ours, -1)
            assert torch.equal(ours, theirs)
            seen |= set(theirs.clamp(max=0).tolist())
            if len(image_boxes):
                moved += int((torchvision_matcher(box_iou(image_boxes, anchors)) != ours).sum())
    assert seen == {-2, -1, 0}  # ignored, background and positive anchors all occur
    assert moved > 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reduced", [False, True])
def test_static_retinanet_loss_equals_the_reference(seed, reduced):
    """The static loss, its parts and its gradients w.r.t. the head's outputs equal the loss it replaced (float
    tolerance: only the summation order differs), with and without a ``reduce_mean`` of the positive count."""
    head = RetinaNetDetectionHead(CHANNELS, 4, 32)
    output, batch = random_detection_batch(seed)
    reduce_mean = (lambda t: 0.5 * t + 3.0) if reduced else None  # noqa: E731  any map of the count will do
    ref, ref_parts = reference_loss(head, output, batch, reduce_mean)
    loss, parts = head.loss(output, batch, reduce_mean)
    leaves = [output["cls_logits"], output["bbox_regression"]]
    ref_grads = torch.autograd.grad(ref, leaves)
    grads = torch.autograd.grad(loss, leaves)
    assert float(parts["positives"]) == ref_parts["positives"]
    assert float(parts["focal"]) == pytest.approx(ref_parts["focal"], rel=1e-5)
    assert float(parts["l1"]) == pytest.approx(ref_parts["l1"], rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)


def test_anchors_are_cached_per_device_and_level_shapes():
    """``predict`` and ``loss`` share one anchor tensor per (device, level shapes), equal to the anchors built on
    the CPU each time as before; other shapes get their own."""
    head = RetinaNetDetectionHead(CHANNELS, 3, 32)
    output, _ = random_detection_batch(0)
    pyramid = output["pyramid"]
    first = head.all_anchors(pyramid)
    assert head.all_anchors([p.clone() for p in pyramid]) is first
    assert all(a.data_ptr() >= first.data_ptr() for a in head.level_anchors(pyramid))  # views of the same tensor
    built = torch.cat([level_anchors(retina_cell_anchors(s), s, *p.shape[-2:]) for s, p in zip(head.strides, pyramid)])
    assert first.dtype == torch.float32 and torch.equal(first, built)
    other = head.all_anchors([p[..., :1, :] for p in pyramid])
    assert other is not first and len(head.anchor_cache) == 2


def small_batches(device="cpu"):
    """One batch per head for the :data:`CHANNELS` backbone on ``device``: 2 images, the second without boxes."""
    def t(*shape):
        return torch.randn(*shape, device=device)
    return {
        "classification": ([t(2, c, 32 // s, 32 // s) for c, s in zip(CHANNELS, (4, 8, 16, 32))],
                           {"label": torch.tensor([0, 2], device=device)}),
        "detection": ([t(2, c, 128 // s, 128 // s) for c, s in zip(CHANNELS, (4, 8, 16, 32))],
                      {"image": t(2, 3, 128, 128),
                       "boxes": [torch.tensor([[10., 12., 60., 50.], [30., 20., 90., 110.]], device=device),
                                 torch.zeros(0, 4, device=device)],
                       "labels": [torch.tensor([0, 2], device=device),
                                  torch.zeros(0, dtype=torch.long, device=device)]}),
        "segmentation": ([t(2, c, 64 // s, 64 // s) for c, s in zip(CHANNELS, (4, 8, 16, 32))],
                         {"mask": torch.randint(0, 3, (2, 64, 64), device=device).index_fill_(
                             2, torch.arange(8, device=device), IGNORE_INDEX)}),
    }


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_loss_parts_are_detached_scalar_tensors(task):
    """Every loss part is a detached 0-dim tensor on the loss's device (a Python number would be a host sync)."""
    torch.manual_seed(0)
    head = task_spec(task).build_head(CHANNELS, DatasetConfig(task, num_classes=3, head_channels=32)).train()
    features, batch = small_batches()[task]
    loss, parts = head.loss(head(features), batch)
    assert parts and loss.dim() == 0 and loss.requires_grad
    for name, value in parts.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name
        assert value.device == loss.device and value.is_floating_point(), name


class NoHostTensors(TorchDispatchMode):
    """Records every op that takes or makes a tensor off ``device``: a host-to-device copy (a blocking copy on
    CUDA) or a CPU tensor created in the step."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.seen = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type != self.device for t in tensors):
            self.seen.append(str(func))
        return out


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_head_forward_and_loss_on_fake_cuda_are_static_and_stay_on_the_device(task):
    """Each head, built on the CPU and moved to (fake) CUDA, runs forward and loss: under ``FakeTensorMode`` an op
    whose output shape depends on values (``nonzero``, boolean-mask indexing), a read of a value on the host
    (``.item()``, ``float``) and an op mixing devices all raise. From the second step on (the first builds the
    anchors) no op takes or makes a CPU tensor, and ``reduce_mean`` receives a CUDA tensor. The loss it replaced
    fails here."""
    torch.manual_seed(0)
    head = task_spec(task).build_head(CHANNELS, DatasetConfig(task, num_classes=3, head_channels=32)).train()
    handed = []

    def reduce_mean(count):
        handed.append(count.device.type)
        return count

    with FakeTensorMode(allow_non_fake_inputs=True):  # real parameters may be moved in; the rest must be fake
        head.to("cuda")
        features, batch = small_batches("cuda")[task]
        head.loss(head(features), batch, reduce_mean)
        with NoHostTensors("cuda") as watch:
            loss, parts = head.loss(head(features), batch, reduce_mean)
        assert watch.seen == []
        assert loss.device.type == "cuda" and loss.dim() == 0
        assert all(v.device.type == "cuda" and v.dim() == 0 for v in parts.values())
        if task == "detection":
            assert handed == ["cuda", "cuda"]
            with pytest.raises((DynamicOutputShapeException, DataDependentOutputException)):
                reference_loss(head, head(features), batch)


def sync_batchnorm_rank(rank: int, world: int, port: int, x: torch.Tensor, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        bn = SyncBatchNorm2d(x.shape[1]).train()
        part = x.chunk(world)[rank].clone().requires_grad_()
        out = bn(part)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        queue.put((rank, *(t.detach().numpy() for t in (out, part.grad, bn.running_mean, bn.running_var))))
    finally:
        torch.distributed.destroy_process_group()


def test_sync_batchnorm_over_two_ranks_equals_batchnorm_over_the_whole_batch():
    """SyncBatchNorm2d on 2 gloo ranks (through ``mthl_ds.runtime.collectives``): each rank's output, input gradient and
    running statistics equal ``nn.BatchNorm2d`` over the whole batch in one process."""
    import socket

    import torch.multiprocessing as mp
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    weights = torch.arange(x.numel() // 2).view(2, 3, 2, 2).float()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=sync_batchnorm_rank, args=(r, 2, port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    whole = x.clone().requires_grad_()
    bn = torch.nn.BatchNorm2d(3).train()
    out = bn(whole)
    (out * torch.cat([weights, weights])).sum().backward()
    for rank, *got in results:
        part_out, part_grad, mean, var = map(torch.from_numpy, got)
        torch.testing.assert_close(part_out, out.detach().chunk(2)[rank])
        torch.testing.assert_close(part_grad, whole.grad.chunk(2)[rank])
        torch.testing.assert_close(mean, bn.running_mean)
        torch.testing.assert_close(var, bn.running_var)
