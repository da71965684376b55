"""The user condition for stage 2: a learned embedding -> small MLP -> a few tokens that
the UNet attends to through cross-attention.

Row k of the embedding is the user with index k in the dataset manifest's label map
(the whole dataset's natural-sorted folder names); row `num_users` is the null token
that classifier-free guidance uses for the unconditional pass (docs/design.md, pitfalls 1
and 2). A diffusers ModelMixin, so it saves and loads as config.json + safetensors.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class UserConditionEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, num_users: int, cross_attention_dim: int, num_tokens: int = 4, embedding_dim: int = 256):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_users + 1, embedding_dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(embedding_dim, embedding_dim),
            torch.nn.SiLU(),
            torch.nn.Linear(embedding_dim, num_tokens * cross_attention_dim),
        )
        self.norm = torch.nn.LayerNorm(cross_attention_dim)

    @property
    def null_index(self):
        return self.config.num_users

    def forward(self, user_indices):
        """(B,) user indices -> (B, num_tokens, cross_attention_dim) tokens."""
        tokens = self.mlp(self.embedding(user_indices))
        return self.norm(tokens.view(len(user_indices), self.config.num_tokens, self.config.cross_attention_dim))


def drop_conditions(user_indices, null_index, probability):
    """Condition dropout for classifier-free guidance: each sample independently becomes
    the null token with `probability`; every other index is left as it is."""
    if probability <= 0:
        return user_indices
    drop = torch.rand(user_indices.shape, device=user_indices.device) < probability
    return torch.where(drop, torch.full_like(user_indices, null_index), user_indices)
