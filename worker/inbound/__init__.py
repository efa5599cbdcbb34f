"""Inbound flow: a patient's message written once into the right thread."""
