"""Conversation templates: a conversation -> token ids with labels on the assistant's replies only."""
