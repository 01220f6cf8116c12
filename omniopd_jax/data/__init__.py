"""Prompts with verifiable answers: sources, chat templates, the resumable iterator, grading and the demo task."""
