"""Conditions beyond class labels: a batch carries text-encoder output (per-token embeddings, mask, pooled vector)
that every source, method and sampler passes through unchanged, with the empty prompt as guidance's null
condition."""

import diffusers
import pytest
import torch

from fewstep import conditions
from fewstep.conditions import TextCondition
from fewstep.data.batch import Batch, CompositeBatch
from fewstep.errors import ConfigError, DataError
from fewstep.guidance import GuidedDenoiser
from fewstep.hub import diffusers_denoiser
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.nets import MLP
from fewstep.student import Student
from fewstep.teachers import Teacher, empty_dataset

TOKENS, DIM = 5, 16


def text(batch: int, seed: int, mask: bool = True) -> TextCondition:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, TOKENS, DIM, generator=generator)
    attention = torch.ones(batch, TOKENS, dtype=torch.long) if mask else None
    return TextCondition(embeddings, attention, torch.randn(batch, 8, generator=generator))


def tiny_text_teacher() -> Teacher:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=DIM,
                                          attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    denoiser = diffusers_denoiser(unet, diffusers.DDPMScheduler(), encoder_hidden_states=torch.zeros(1, TOKENS, DIM))
    null = TextCondition(torch.zeros(1, TOKENS, DIM), torch.ones(1, TOKENS, dtype=torch.long), torch.zeros(1, 8))
    return Teacher(denoiser, empty_dataset("text", denoiser, "images"), "tiny-text", guidance_scale=3.0, null=null)


def test_text_conditions_take_rows_move_and_join():
    cond = text(6, 0)
    assert len(cond) == 6 and torch.equal(cond[2:4].embeddings, cond.embeddings[2:4])
    assert torch.equal(cond[torch.tensor([5, 0])].pooled, cond.pooled[[5, 0]])
    joined = conditions.cat(cond[:2], cond[2:])
    assert all(torch.equal(a, b) for a, b in zip((joined.embeddings, joined.mask, joined.pooled),
                                                  (cond.embeddings, cond.mask, cond.pooled), strict=True))
    assert len(cond[:1].expand(4)) == 4 and cond.to(torch.float64).embeddings.dtype == torch.float64
    with pytest.raises(ValueError, match="mask"):
        conditions.cat(cond, text(2, 1, mask=False))
    with pytest.raises(TypeError, match="join"):
        conditions.cat(cond, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        TextCondition(torch.zeros(3, TOKENS, DIM), torch.ones(2, TOKENS))


def test_batches_carry_text_conditions_through_slicing_and_moving():
    batch = Batch(x0=torch.randn(6, 4, 8, 8), cond=text(6, 0))
    part = batch.rows(2, 5).to("cpu")
    assert part.size == 3 and torch.equal(part.cond.embeddings, batch.cond.embeddings[2:5])
    both = CompositeBatch({"data": batch, "noise": Batch(noise=torch.randn(6, 4, 8, 8), cond=text(6, 1))})
    assert torch.equal(both.rows(0, 2)["noise"].cond.pooled, both["noise"].cond.pooled[:2])


def test_a_text_teacher_reads_each_samples_own_prompt():
    teacher = tiny_text_teacher()
    x, s = torch.randn(4, 4, 8, 8), torch.full((4,), 3.0)
    cond = text(4, 0)
    together = teacher.denoiser(x, s, cond)
    apart = torch.cat([teacher.denoiser(x[i:i + 1], s[i:i + 1], cond[i:i + 1]) for i in range(4)])
    assert torch.allclose(together, apart, atol=1e-5)
    other = teacher.denoiser(x, s, text(4, 1))
    assert not torch.allclose(together, other, atol=1e-4)  # the prompt reaches the network


def test_guidance_on_text_uses_the_empty_prompt_as_its_null_condition():
    teacher = tiny_text_teacher()
    x, s, cond = torch.randn(3, 4, 8, 8), torch.full((3,), 2.0), text(3, 0)
    conditional = teacher.denoiser(x, s, cond)
    unconditional = teacher.denoiser(x, s, teacher.null.expand(3))
    expected = unconditional + 3.0 * (conditional - unconditional)
    assert torch.allclose(teacher.guided(x, s, cond), expected, atol=1e-5)
    with pytest.raises(ValueError, match="null condition"):
        GuidedDenoiser(teacher.denoiser, 3.0)(x, s, cond)


def test_consistency_distillation_trains_on_text_conditions_and_its_student_samples_with_them():
    """CD on a tiny text-conditioned UNet teacher: a batch of different prompts flows through the teacher's guided
    Heun step, the target network and the student, and the trained student samples per prompt."""
    teacher = tiny_text_teacher()
    config = CDConfig(num_scales=6)
    student = ConsistencyDistillation.build_student(teacher.guided, config, lambda: None, 0.5)
    method = ConsistencyDistillation(teacher.guided, student, config)
    before = [p.detach().clone() for p in method.student.parameters()]
    optimizer = torch.optim.Adam(method.student.parameters(), lr=1e-3)
    for step in range(2):
        batch = Batch(x0=torch.randn(4, 4, 8, 8), cond=text(4, step))
        loss = method.losses("student", batch, step, torch.Generator().manual_seed(step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and method.teacher_evals == 2 * 2 * 4  # two Heun evaluations per sample
    assert any(not torch.equal(a, b) for a, b in zip(before, method.student.parameters(), strict=True))
    trained = Student(method.student, "cd", {1: method.sampling(1)}, teacher.dataset)
    first, second = (trained.sample(2, 1, cond=text(2, seed), seed=0) for seed in (3, 4))
    assert first.shape == (2, 4, 8, 8) and not torch.allclose(first, second, atol=1e-5)
    with pytest.raises(ConfigError, match="label"):
        trained.sample(2, 1, label=torch.zeros(2, dtype=torch.long), cond=text(2, 3))


def test_a_teacher_samples_with_text_and_a_label_backbone_refuses_it():
    teacher = tiny_text_teacher()
    samples = teacher.sample(2, "euler", 2, cond=text(2, 0))
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
    mlp = MLP((2,), width=8, depth=1, num_classes=3)
    with pytest.raises(DataError, match="class labels"):
        mlp(torch.zeros(2, 2), torch.zeros(2), text(2, 0))
