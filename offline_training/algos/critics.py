"""
IQL's reward critics, shared by every algorithm that learns Q_r and V_r by expectile regression.

FISOR (Eq. 15, 16) and DRCORL (Eq. 16, 17) both take them from IQL (Kostrikov et al. 2022):
V_r regresses an upper expectile of the target critics' min over heads, Q_r regresses the
one-step target r + gamma V_r(s'). Only the expectile differs (FISOR 0.9, DRCORL 0.7).
"""

import torch


def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """Return IQL's expectile loss |tau - 1(u < 0)| u^2 per element (upper expectile, tau > .5)."""
    weight = torch.where(u < 0, 1.0 - tau, tau)
    return weight * u.pow(2)


def reward_value_loss(q_r_target_heads: torch.Tensor, v_r: torch.Tensor,
                      tau: float) -> torch.Tensor:
    """Return IQL's V_r loss: expectile of u = min_j Qbar_r^j(s, a) - V_r(s), batch mean."""
    u = q_r_target_heads.min(dim=0).values - v_r
    return expectile_loss(u, tau).mean()


def reward_target(rewards: torch.Tensor, v_r_next: torch.Tensor, mask: torch.Tensor,
                  gamma: float) -> torch.Tensor:
    """Return the Q_r regression target r + gamma mask V_r(s') (mask 0 ends the episode)."""
    return rewards + gamma * mask * v_r_next
