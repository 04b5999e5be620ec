"""fxsdc: simulate and detect silent data corruption in transformer attention with torch.fx."""
