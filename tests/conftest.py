"""Shared test setup: one torch thread (2-core machines; see ENVIRONMENT.md)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
