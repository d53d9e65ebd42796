"""Drop-in modules: parameters with AllenNLP / torch.nn names, forward through elmo_fast.functional."""
from elmo_fast.nn.char_cnn import CharCNN
from elmo_fast.nn.highway import Highway
from elmo_fast.nn.lstm import LSTM, LstmCellWithProjection

__all__ = ["CharCNN", "Highway", "LSTM", "LstmCellWithProjection"]
