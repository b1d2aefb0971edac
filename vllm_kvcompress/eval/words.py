"""A fixed vocabulary of plain English words for keys, distractors and word lists.

Written out here so the tasks need no download and stay identical across machines.
"""

from __future__ import annotations

NOUNS = tuple("""
apple anchor arrow autumn badge bakery balloon banner barrel basket beach beard bell bench
berry bicycle blanket bottle bracelet branch bread bridge brush bucket bullet butter button
cabin cable cactus camera candle canoe canyon carpet castle cellar chain chair chalk cherry
chimney circle cliff clock cloud coast coffee collar comet copper corner cotton country
crayon cricket crown cup curtain cushion daisy desert diamond dinner dolphin donkey dragon
drawer dream drum eagle engine envelope falcon feather fence ferry field finger flag flame
flower forest fountain fox frost garden garlic gate ghost glacier glove goat granite grape
guitar hammer harbor harvest hat helmet hill honey horizon horse island jacket jar jelly
jewel jungle kettle kitchen kite ladder lake lantern leaf lemon letter library lighthouse
lily lion lizard lobster locket magnet mango maple marble market meadow melon mirror
monkey moon mountain mushroom needle nest notebook ocean olive onion orange orchard otter
oven owl paddle palace panda paper parrot peach pearl pebble pencil pepper piano pillow
pine planet plate pocket pond potato pumpkin puzzle quilt rabbit radio rainbow raven
ribbon river robot rocket roof rose saddle sailor salmon sandal satchel scarf shadow shell
shield ship shovel silver skate sled slipper snail spider spoon squirrel stable stamp star
statue stone storm stove straw stream sugar summit sunflower swan sword table tablet
teapot temple tent thimble thunder ticket tiger timber tomato torch tower tractor train
trumpet tulip tunnel turtle umbrella valley vase velvet village violin volcano wagon
walnut wardrobe whale wheel whistle willow window winter wizard wolf wool yacht zebra
""".split())

ADJECTIVES = tuple("""
ancient brave bright calm clever cold crisp curious dark eager early fancy fierce gentle
giant golden grand happy hidden humble icy jolly keen kind large lively lonely lucky
mellow merry mighty misty modest noble odd pale patient plain polite proud quick quiet
rapid rare rough royal rusty sandy shiny silent silky sleepy slow small smooth snowy
soft solid sour spicy steady stormy sunny sweet swift tall tiny tough vivid warm wild
wise witty young
""".split())
