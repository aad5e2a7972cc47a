"""Exploration and diversity at serving time: bandit re-ranking on the device.

* :mod:`~shared.bandits.policies`: :class:`BanditConfig` and the policies (greedy,
  epsilon-greedy, linear Thompson sampling, LinUCB) behind one ``select`` / ``update`` /
  ``state_dict`` interface.
* :mod:`~shared.bandits.diversity`: MMR re-ranking and beyond-accuracy metrics.
* :mod:`~shared.bandits.harness`: simulated sessions on the synthetic world (regret, coverage).
* :mod:`~shared.bandits.replay`: Li et al. replay on MovieLens and the HR@10 cost of diversity.
"""

from shared.bandits.diversity import (
    MMRReranker,
    catalog_coverage,
    intra_list_diversity,
    item_popularity,
    mmr_select,
    novelty,
)
from shared.bandits.policies import (
    POLICY_NAMES,
    BanditConfig,
    EpsilonGreedyPolicy,
    GreedyPolicy,
    LinearPosterior,
    LinUCBPolicy,
    Policy,
    ThompsonPolicy,
    make_policy,
)

__all__ = [
    "POLICY_NAMES",
    "BanditConfig",
    "EpsilonGreedyPolicy",
    "GreedyPolicy",
    "LinUCBPolicy",
    "LinearPosterior",
    "MMRReranker",
    "Policy",
    "ThompsonPolicy",
    "catalog_coverage",
    "intra_list_diversity",
    "item_popularity",
    "make_policy",
    "mmr_select",
    "novelty",
]
