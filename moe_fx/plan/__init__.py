"""Plans: which experts and channels each block keeps (:class:`PrunePlan`, :class:`ChannelPlan`), made from
scores under a budget (:mod:`~moe_fx.plan.allocate`, :mod:`~moe_fx.plan.channel_allocate`) or found by an
evolutionary search (:mod:`~moe_fx.plan.eep`). Everything that changes a model goes through a plan."""

from moe_fx.plan.plans import WIDTH_ALIGN, ChannelPlan, PrunePlan

__all__ = ["WIDTH_ALIGN", "ChannelPlan", "PrunePlan"]
