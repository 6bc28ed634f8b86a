from twisted.application.service import ServiceMaker

from tm3.tls import TLSServerParser

tm3rp = ServiceMaker(
    "TM3 remote proxy", "tm3.rp.tap", "TM3 remote proxy (RP): the server side of the multi-pipe multiplexer", "tm3rp"
)
tm3lp = ServiceMaker(
    "TM3 local proxy",
    "tm3.lp.tap",
    "TM3 local proxy (LP): carries intercepted connections over pipes to a TM3 RP",
    "tm3lp",
)
# tls:PORT:privateKey=...:certificate=...[:caCerts=...] (tm3/tls.py).
tm3_tls_server = TLSServerParser()
