from twisted.application.service import ServiceMaker

tm3rp = ServiceMaker("TM3 remote proxy", "tm3.rp_tap", "TM3 remote proxy (RP): the server side of the multi-pipe multiplexer", "tm3rp")
