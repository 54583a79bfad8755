"""Scoring of generations: answer extraction and metrics shared by training tasks and the eval stage."""
