"""Rewrites: passes that change the model's weights following a plan (drop or merge experts, remove
channels) and passes that repair what the removal cost (compensation, distillation)."""
