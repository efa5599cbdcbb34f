"""Provider webhooks: one module per provider."""
