"""CLI entry, stage runner, LightningModule, DataModules, results and resume."""
