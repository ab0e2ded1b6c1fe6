"""The training wizard: base model → dataset → adapter → review, then Train."""

from app.gui.wizard.wizard import TrainingWizard

__all__ = ["TrainingWizard"]
