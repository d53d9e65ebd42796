"""Drop-in modules: parameters with AllenNLP / torch.nn names, forward through elmo_fast.functional."""
from elmo_fast.nn.char_cnn import CharCNN
from elmo_fast.nn.highway import Highway

__all__ = ["CharCNN", "Highway"]
