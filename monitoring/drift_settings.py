"""How drift is judged: sample sizes and thresholds, in a module of their own so the config can reuse
the fields without importing what measures drift (torch, pandas, Evidently)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DriftSettings(BaseModel):
    max_samples: int = Field(2000, ge=10, description="Prompts sampled from each side at most (bounds cost).")
    min_samples: int = Field(50, ge=2, description="Fewer prompts on either side → 'insufficient data'.")
    num_threshold: float = Field(
        0.1, gt=0, description="Normed Wasserstein distance beyond which a numerical prompt feature drifted.")
    drift_share: float = Field(0.5, gt=0, le=1, description="Share of drifted features that makes the verdict drift.")
    seed: int = Field(0, description="Seed of the sampling.")
