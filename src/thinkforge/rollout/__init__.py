"""Generation engines behind one small interface (`base.RolloutEngine`), built in one place from their settings
(`engines.build_engine`, `settings.RolloutConfig`), so a stage never depends on how rollouts are produced."""
