"""Distillation methods, one file each, in one folder per family. :data:`METHODS` is the registry: name -> class."""

from fewstep.methods.base import DistillationMethod
from fewstep.methods.consistency.consistency_distillation import ConsistencyDistillation
from fewstep.methods.consistency.consistency_training import ConsistencyTraining
from fewstep.methods.consistency.continuous_consistency import SCD, SCT
from fewstep.methods.consistency.easy_consistency_tuning import EasyConsistencyTuning
from fewstep.methods.consistency.improved_consistency_training import ImprovedConsistencyTraining
from fewstep.methods.consistency.latent_consistency import LatentConsistency
from fewstep.methods.consistency.phased_consistency import PhasedConsistency
from fewstep.methods.consistency.score_regularized_consistency import ScoreRegularizedConsistency
from fewstep.methods.consistency.slam import SubpathLinearApproximation
from fewstep.methods.consistency.trajectory_backward_consistency import TrajectoryBackwardConsistency
from fewstep.methods.distribution.diff_instruct import DiffInstruct
from fewstep.methods.distribution.dmd import DMD
from fewstep.methods.distribution.dmd2 import DMD2
from fewstep.methods.distribution.f_distill import FDistill
from fewstep.methods.distribution.few_step_sid import FewStepSiD
from fewstep.methods.distribution.sid import SiD
from fewstep.methods.distribution.sim import SIM
from fewstep.methods.distribution.swiftbrush import SwiftBrush
from fewstep.methods.distribution.tdm import TDM
from fewstep.methods.distribution.uni_instruct import UniInstruct
from fewstep.methods.flow.boot import BOOT
from fewstep.methods.flow.flow_map import FlowMapDistillation
from fewstep.methods.flow.flow_map_free import FlowMapWithoutData
from fewstep.methods.flow.instaflow import InstaFlow
from fewstep.methods.flow.mdt_dist import MDTDist
from fewstep.methods.flow.meanflow import MeanFlow
from fewstep.methods.flow.reflow import Reflow
from fewstep.methods.flow.rfpp import RFPP
from fewstep.methods.flow.slimflow import SlimFlow
from fewstep.methods.flow.twinflow import TwinFlow
from fewstep.methods.trajectory.consistency_trajectory import ConsistencyTrajectory
from fewstep.methods.trajectory.hyper_sd import HyperSD
from fewstep.methods.trajectory.progressive_distillation import ProgressiveDistillation

METHODS: dict[str, type[DistillationMethod]] = {
    cls.name: cls for cls in (
        ProgressiveDistillation,
        ConsistencyDistillation, ConsistencyTraining, ImprovedConsistencyTraining, EasyConsistencyTuning,
        LatentConsistency, PhasedConsistency, HyperSD, SubpathLinearApproximation,
        ConsistencyTrajectory, TrajectoryBackwardConsistency,
        SCT, SCD, ScoreRegularizedConsistency,
        DMD, DMD2, DiffInstruct, SwiftBrush, SiD, FewStepSiD, SIM, FDistill, UniInstruct, TDM,
        MeanFlow, FlowMapDistillation, FlowMapWithoutData,
        Reflow, InstaFlow, RFPP, SlimFlow,
        BOOT, MDTDist, TwinFlow,
    )
}

__all__ = ["METHODS", "DistillationMethod"]
